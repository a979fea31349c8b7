"""choose_placement's decisions on made-up free memory and estimates (no GPU needed), the
LoadOptions checks, and the deprecated `mode=` names."""
import warnings

import pytest

from qlora_ext.options import LoadOptions, placement_of_mode
from qlora_ext.placement import MARGIN_BYTES, MARGIN_FRACTION, Placement, decide, fewest_recompute

GIB = 2**30
L = 8


def _need(base=10 * GIB, act=2 * GIB, inp=GIB // 8, streamed_saves=3 * GIB):
    """A fake estimate shaped like the real one: a fixed part, one LayerActs per layer that
    keeps them, one shared by the recomputing layers, a saved input per recomputing layer."""
    calls = []

    def need(weights, R):
        calls.append((weights, R))
        acts = (L - R + (1 if R else 0)) * act + R * inp
        return base + acts - (streamed_saves if weights == "streamed" else 0)
    need.calls = calls
    return need


def _room(nbytes):
    return int(nbytes * (1 + MARGIN_FRACTION) + MARGIN_BYTES) + 1


def _decide(free, need=None, asked="auto", fixed=None):
    return decide(asked, L, free, "test", need or _need(), fixed, "GPU-X", (4, 1024))


def test_everything_fits_keeps_every_activation():
    name, weights, R, reason = _decide(200 * GIB)
    assert (name, weights, R) == ("gpu", "on GPU", 0)
    assert "GPU-X has 200.0 GiB free (test)" in reason and "every layer's activations kept" in reason


@pytest.mark.parametrize("R", [2, 3, 5, L])
def test_recomputes_the_fewest_layers_that_fit(R):
    need = _need()
    name, weights, got, reason = _decide(_room(need("on GPU", R)), need)
    assert (name, weights, got) == ("gpu", "on GPU", R)
    assert f"{R} of {L} layers recompute their activations (the fewest that fit)" in reason
    # the bisection asks few estimates, not one per layer count
    assert len(set(need.calls)) <= 2 + L.bit_length() + 1


def test_recomputing_one_layer_never_helps():
    """One recomputing layer keeps L LayerActs (L - 1 own + the shared one) and a saved input:
    more than none recomputing, so it is never the answer."""
    need = _need()
    assert need("on GPU", 1) > need("on GPU", 0)
    _, _, R, _ = _decide(_room(need("on GPU", 0)) - GIB // 4, need)
    assert R == 2


def test_streams_the_base_when_recompute_alone_does_not_fit():
    need = _need(streamed_saves=5 * GIB)
    name, weights, R, reason = _decide(_room(need("streamed", L)), need)
    assert (name, weights) == ("gpu", "streamed") and R == L
    assert "streamed per layer" in reason


def test_forced_checkpointing_is_taken_as_given():
    need = _need()
    assert _decide(200 * GIB, need, fixed=L)[1:3] == ("on GPU", L)
    _, _, _, reason = _decide(200 * GIB, need, fixed=L)
    assert "activation checkpointing on every layer (asked for)" in reason
    # forced off and short of memory: the base streams rather than recomputing
    name, weights, R, reason = _decide(_room(need("streamed", 0)), need, fixed=0)
    assert (name, weights, R) == ("gpu", "streamed", 0) and "no activation checkpointing (asked for)" in reason


def test_too_little_memory_goes_split_or_says_so():
    name, weights, R, reason = _decide(GIB)
    assert name == "split" and "even with the NF4 base streamed" in reason
    name, weights, R, reason = _decide(GIB, asked="gpu")
    assert (name, weights, R) == ("gpu", "streamed", L) and reason.startswith("asked for; ")
    assert "less than" in reason


def test_unknown_free_memory():
    name, _, R, reason = _decide(None)
    assert name == "split" and "QLORA_EXT_GPU_MEMORY_GIB" in reason and R == 0
    name, weights, R, reason = _decide(None, asked="gpu", fixed=L)
    assert (name, weights, R) == ("gpu", "on GPU", L) and "asked for" in reason


def test_fewest_recompute_edges():
    assert fewest_recompute(4, lambda r: True) == 0
    assert fewest_recompute(4, lambda r: False) is None
    assert fewest_recompute(4, lambda r: r >= 3) == 3
    assert fewest_recompute(4, lambda r: r >= 3, fixed=4) == 4
    assert fewest_recompute(4, lambda r: r >= 3, fixed=0) is None
    assert fewest_recompute(0, lambda r: False) is None


def test_placement_is_frozen_data():
    p = Placement("gpu", "on GPU", 3, "why")
    with pytest.raises(AttributeError):
        p.name = "cpu"
    assert p == Placement("gpu", "on GPU", 3, "why", adapter=object())   # the adapter is not compared


def test_load_options_are_checked():
    import qlora_ext as qx

    assert qx.LoadOptions is LoadOptions
    assert LoadOptions().placement == "auto" and LoadOptions().gradient_checkpointing is None
    with pytest.raises(ValueError, match="placement must be one of"):
        LoadOptions(placement="resident")
    with pytest.raises(ValueError, match="device='cpu'"):
        LoadOptions(placement="gpu", device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        LoadOptions(device="tpu")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        LoadOptions(gradient_checkpointing=-1)
    with pytest.raises(ValueError, match="batch_shape"):
        LoadOptions(batch_shape=(0, 4))
    with pytest.raises(ValueError, match="unknown load option 'placment'"):
        LoadOptions().replace(placment="gpu")
    assert LoadOptions().replace(placement="split", batch_shape=[2, 8]).batch_shape == (2, 8)


@pytest.mark.parametrize("mode,device,placement", [
    ("resident", "auto", "gpu"), ("resident", "gpu", "gpu"), ("split", "auto", "split"), ("split", "cpu", "cpu"),
    ("auto", "cpu", "auto")])
def test_deprecated_mode_maps_and_warns(mode, device, placement):
    assert placement_of_mode(mode, device) == placement
    with pytest.warns(DeprecationWarning, match=f"mode={mode!r} is deprecated: use placement={placement!r}"):
        opts = LoadOptions(device=device).replace(mode=mode)
    assert opts.placement == placement
    with pytest.raises(ValueError, match="mode must be one of"):
        placement_of_mode("gpu")


def test_load_model_mode_alias_on_cpu(tmp_path):
    """load_model(mode="split", device="cpu") warns and gives the cpu placement."""
    from model_factory import make_tiny_checkpoint
    from qlora_ext.api import load_model

    path = make_tiny_checkpoint(tmp_path / "m", model_type="qwen3", seed=1)
    with pytest.warns(DeprecationWarning, match="use placement='cpu'"):
        m = load_model(path, device="cpu", mode="split")
    assert m.placement == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = load_model(path, options=LoadOptions(placement="cpu", gradient_checkpointing=True))
    assert m.placement == "cpu" and m.recompute_layers == len(m.state.layers) and m.placement_reason == "asked for; activation checkpointing on every layer (asked for)"
    with pytest.raises(ValueError, match="options must be a qlora_ext LoadOptions"):
        load_model(path, options={"placement": "cpu"})
