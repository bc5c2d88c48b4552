"""The four classes, in the index order used everywhere (model heads, ensemble inputs, output columns)."""

CLASSES: tuple[str, ...] = ("covid", "viral", "bacterial", "normal")
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
