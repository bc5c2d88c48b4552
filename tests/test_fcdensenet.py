"""FC-DenseNet family: output shapes, the paper's parameter count, input-size checks."""

from __future__ import annotations

import pytest
import torch

from patchflannel.models import get_model, list_models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_family_is_registered() -> None:
    assert {"fcdensenet103", "fcdensenet67", "fcdensenet56"} <= set(list_models("segmentation"))


def test_fcdensenet103_parameter_count_matches_paper() -> None:
    # Jégou et al. 2017, Table 1/2: FC-DenseNet103 has 9.4M parameters.
    assert abs(n_params(get_model("fcdensenet103")) - 9.4e6) / 9.4e6 < 0.02


def test_smaller_members_are_smaller() -> None:
    n56, n67, n103 = (n_params(get_model(n)) for n in ("fcdensenet56", "fcdensenet67", "fcdensenet103"))
    assert n56 < n67 < n103
    # Paper: FC-DenseNet56 1.5M, FC-DenseNet67 3.5M parameters.
    assert abs(n56 - 1.5e6) / 1.5e6 < 0.1
    assert abs(n67 - 3.5e6) / 3.5e6 < 0.1


@pytest.mark.parametrize("name", ["fcdensenet56", "fcdensenet103"])
def test_output_shape_is_one_logit_map_at_input_size(name: str) -> None:
    model = get_model(name).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, 64, 96)
    assert torch.isfinite(y).all()


def test_gradients_reach_the_first_layer() -> None:
    model = get_model("fcdensenet56")
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert model.first.weight.grad is not None and model.first.weight.grad.abs().sum() > 0


def test_dropout_drops_single_values_not_whole_feature_maps() -> None:
    """SPEC/Jégou et al.: Dropout(0.2) in each dense layer and transition down, element-wise (Lasagne's
    DropoutLayer), not whole channels (Dropout2d, a much stronger regulariser with 16 new maps a layer)."""
    torch.manual_seed(0)
    model = get_model("fcdensenet56").train()
    drops = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert drops and all(type(m) is torch.nn.Dropout and m.p == 0.2 for m in drops)
    out = drops[0](torch.ones(2, 16, 32, 32))
    assert 0.15 < (out == 0).float().mean() < 0.25 and (out != 0).flatten(2).any(-1).all()


def test_input_side_not_multiple_of_32_is_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        get_model("fcdensenet56")(torch.randn(1, 1, 48, 64))
