"""Scale-out scoring on a Ray cluster with Ray Data: one engine per actor, one GPU each where there are GPUs.

The input list becomes a dataset (``ray.data.from_items``: path plus the manifest columns); ``map_batches``
runs it through a fixed-size actor pool whose actors each build one engine; the driver pulls the result
batches with ``iter_batches`` and writes them with the same chunked, resumable writer as a local run, so the
output has the same columns and, for the same inputs, bundle and seed, the same values. Input paths and the
bundle path must be readable on every node (a shared file system), see docs/scoring.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from patchflannel.errors import ConfigError, first_line
from patchflannel.scoring.inputs import ScoreInput
from patchflannel.scoring.run import EngineOptions, describe_engine, prediction_row

ENGINE_COLUMN = "_engine"
"""Column each actor adds to its batches (its engine's description, host and pid, JSON); the driver removes it."""


class EngineActor:
    """A Ray Data actor: one engine, applied to batches of inputs (pyarrow tables with ``path`` and extras)."""

    def __init__(self, options: EngineOptions, schema: pa.Schema) -> None:
        self.engine = options.engine()
        self.schema = schema
        where = {"host": socket.gethostname(), "pid": os.getpid()}
        self.description = json.dumps({**describe_engine(self.engine), **where}, sort_keys=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score one batch; returns the output rows (same schema as a local run) plus the engine column."""
        items = batch.to_pylist()
        preds = self.engine.predict_many([(item["path"], os.fsdecode(item["file"])) for item in items])
        rows = [prediction_row(pred, {k: v for k, v in item.items() if k not in ("path", "file")})
                for item, pred in zip(items, preds)]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        return table.append_column(ENGINE_COLUMN, pa.array([self.description] * table.num_rows, pa.string()))


def ray_rows(items: list[ScoreInput], schema: pa.Schema, options: EngineOptions, *, address: bool | str = True,
             actors: int | None = None, batch_size: int = 16) -> tuple[Iterator[dict[str, Any]], dict[str, Any]]:
    """Output rows of ``items`` scored on Ray, as they complete, and the run's description.

    ``address``: True lets ``ray.init()`` choose (RAY_ADDRESS, a running local cluster, else a new local
    instance); a string is passed as ``ray.init(address=...)``. A Ray session already initialised in this
    process is used as it is. ``actors`` defaults to one per GPU of the cluster, else one per CPU. The
    description is filled in while the rows are consumed (cluster resources, actors, each engine's
    description).
    """
    description: dict[str, Any] = {"ray": {"address": address}, "engines": []}
    if options.bundle is not None:  # the actors run in other working directories (input paths are absolute too)
        options = dataclasses.replace(options, bundle=str(Path(options.bundle).resolve()))
    return _rows(items, schema, options, address, actors, batch_size, description), description


def check_address(address: bool | str) -> None:
    """Refuse a Ray address (``host:port`` or ``ray://host:port``) at which nothing answers, before anything is
    written: ``ray.init`` itself retries for minutes. True, ``auto`` and ``local`` are left to Ray."""
    if not isinstance(address, str) or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start a Ray "
                          "head there (`ray start --head`) or check the address") from None


def _rows(items: list[ScoreInput], schema: pa.Schema, options: EngineOptions, address: bool | str,
          actors: int | None, batch_size: int, description: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if not items:
        return
    import ray
    import ray.data

    own_session = not ray.is_initialized()
    if own_session:
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            ray.init(address=None if address is True else address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - something answers there, but not a Ray cluster
            where = "a local Ray instance" if address is True else f"--ray-address {address}"
            raise ConfigError(f"{where}: cannot start or join a Ray cluster ({first_line(exc)}); check the address "
                              "(a Ray head: `ray start --head`) or RAY_ADDRESS") from None
        if main and sigterm is not None:  # ray.init sets its own (sys.exit): SIGTERM stops a run as the caller chose
            signal.signal(signal.SIGTERM, sigterm)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        size = actors or gpus or max(1, int(resources.get("CPU", 1)))
        description["ray"].update({"version": ray.__version__, "actors": size, "gpus_per_actor": 1 if gpus else 0,
                                   "cluster_resources": {k: resources[k] for k in ("CPU", "GPU") if k in resources}})
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows its own bar
        # The name to open as bytes (it need not be valid UTF-8, which Arrow's strings must be).
        records = [{"path": i.path, "file": os.fsencode(i.source), **i.extra} for i in items]
        blocks = min(len(records), max(size, math.ceil(len(records) / batch_size)))
        dataset = ray.data.from_items(records, override_num_blocks=blocks).map_batches(
            EngineActor, fn_constructor_kwargs={"options": options, "schema": schema}, batch_size=batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size), num_gpus=1 if gpus else 0,
            num_cpus=1)
        seen: set[str] = set()
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for engine in set(batch.column(ENGINE_COLUMN).to_pylist()) - seen:
                seen.add(engine)
                description["engines"].append(json.loads(engine))
            yield from batch.drop_columns([ENGINE_COLUMN]).to_pylist()
    finally:
        if own_session:
            ray.shutdown()
