"""Models dispatched by accelerate (device_map, CPU/disk offload hooks) give the plain model's
statistics and edit; an offloaded edited layer is refused with a clear error.

On CPU the offloaded layers' parameters sit on the meta device and accelerate's hooks materialise
them from their weights map (RAM for ``cpu_offload``, memory-mapped files for ``"disk"``) during
each forward — the same code path as GPU + offload, minus the device copy.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from tiny_models import REQUESTS, corpus, llama

import zu_fast
from zu_fast import UnlearnConfig, ZuFastError
from zu_fast.model import model_device

TEMPLATES = [["{}"], ["Because I. {}", "You. {}"]]


def _device_map(disk_layers: set[int]) -> dict[str, str]:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk"}
    for i in range(4):
        dm[f"model.layers.{i}"] = "disk" if i in disk_layers else "cpu"
    return dm


def _dispatched(tmp_path, disk_layers: set[int]):
    model, tok = llama()
    return dispatch_model(model, device_map=_device_map(disk_layers), offload_dir=str(tmp_path / "offload")), tok


def _cfg(**kw) -> UnlearnConfig:
    return UnlearnConfig(**{"layers": [1, 2], "progress": False, "v_num_grad_steps": 4, **kw})


def _assert_same_stats(a, b) -> None:
    for layer in (1, 2):
        assert a[layer].n == b[layer].n
        assert torch.allclose(a[layer].kk, b[layer].kk, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a[layer].ks, b[layer].ks, rtol=1e-6, atol=1e-8)


def test_disk_offloaded_layers_give_the_same_statistics_and_fingerprint(tmp_path):
    plain, tok = llama()
    texts = corpus(30)
    ref = zu_fast.collect_stats(plain, tok, texts, _cfg(stats_mode="measured"), cache=False)
    # layer 2 (edited, the deepest) and everything above it live on disk, materialised on the fly
    model, _ = _dispatched(tmp_path, {2, 3})
    assert model.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    st = zu_fast.collect_stats(model, tok, texts, _cfg(stats_mode="measured"), cache=False)
    _assert_same_stats(ref, st)
    assert torch.allclose(st[2].vk, ref[2].vk, rtol=1e-5, atol=1e-6)
    assert st[2].kk.device.type == "cpu"  # accumulators on the execution device, never on meta
    # the fingerprint reads offloaded weights from the offload map: a cache is shared with the plain model
    assert st.meta["model_fingerprint"] == ref.meta["model_fingerprint"]
    other, _ = llama(seed=1)
    other = dispatch_model(other, device_map=_device_map({2, 3}), offload_dir=str(tmp_path / "offload2"))
    st_other = zu_fast.collect_stats(other, tok, texts[:4], _cfg(), cache=False)
    assert st_other.meta["model_fingerprint"] != st.meta["model_fingerprint"]


def test_cpu_offload_whole_model_statistics(tmp_path):
    plain, tok = llama()
    texts = corpus(24)
    ref = zu_fast.collect_stats(plain, tok, texts, _cfg(), cache=False)
    model, _ = llama()
    cpu_offload(model, execution_device=torch.device("cpu"))  # every weight in a RAM map, meta in the model
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model_device(model).type == "cpu"  # token ids go to the execution device, not to meta
    _assert_same_stats(ref, zu_fast.collect_stats(model, tok, texts, _cfg(), cache=False))


def test_unlearn_on_a_dispatched_model_matches_the_plain_edit(tmp_path):
    texts = corpus(30)
    plain, tok = llama()
    cfg = _cfg()
    e_plain = zu_fast.unlearn(plain, tok, REQUESTS, cfg, stats=zu_fast.collect_stats(plain, tok, texts, cfg,
                                                                                      cache=False),
                              context_templates=TEMPLATES)
    model, _ = _dispatched(tmp_path, {3})  # layer 3, final norm and LM head on disk; edited layers resident
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    stats = zu_fast.collect_stats(model, tok, texts, cfg, cache=False)
    # the z optimisation backpropagates through the disk-offloaded layer 3 and LM head
    e_disp = zu_fast.unlearn(model, tok, REQUESTS, cfg, stats=stats, context_templates=TEMPLATES)
    for layer in (1, 2):
        assert torch.allclose(e_disp.factors[layer], e_plain.factors[layer], rtol=1e-4, atol=1e-6)
        w_d = model.get_submodule(f"model.layers.{layer}.mlp.down_proj").weight
        w_p = plain.get_submodule(f"model.layers.{layer}.mlp.down_proj").weight
        assert torch.allclose(w_d, w_p, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, before)  # an edit happened
    e_disp.restore()
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)


def test_offloaded_edited_layer_is_refused_and_nothing_changes(tmp_path):
    model, tok = _dispatched(tmp_path, {2, 3})
    stats = zu_fast.collect_stats(model, tok, corpus(20), _cfg(), cache=False)  # statistics are fine
    w1 = model.model.layers[1].mlp.down_proj.weight.clone()
    with pytest.raises(ZuFastError, match=r"layer 2: 'model\.layers\.2\.mlp\.down_proj' is offloaded"):
        zu_fast.unlearn(model, tok, REQUESTS, _cfg(), stats=stats, context_templates=TEMPLATES)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, w1)


# ----------------------------------------------------------------- loading only the needed layers ---------


@pytest.mark.parametrize("kind", ["llama_sharded", "gpt2_single_file"])
def test_stats_from_a_model_path_load_only_the_needed_layers(tmp_path, kind, monkeypatch):
    from safetensors import safe_open
    from tiny_models import gpt2

    if kind == "llama_sharded":
        model, tok = llama()
        cfg = _cfg()
        model.save_pretrained(tmp_path / "m", max_shard_size="40KB")  # several shards + index.json
        assert (tmp_path / "m" / "model.safetensors.index.json").exists()
        above = "model.layers.3."
    else:
        model, tok = gpt2(layers=3)
        cfg = UnlearnConfig.for_model(model, layers=[0, 1], progress=False)
        model.save_pretrained(tmp_path / "m")
        assert (tmp_path / "m" / "model.safetensors").exists()
        above = "transformer.h.2."
    tok.save_pretrained(tmp_path / "m")
    texts = corpus(20)
    ref = zu_fast.collect_stats(model, tok, texts, cfg, cache=False)

    read: list[str] = []  # every tensor name read from the shards
    real_open = safe_open

    class _Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr("safetensors.safe_open", _Spy)
    st = zu_fast.collect_stats(str(tmp_path / "m"), None, texts, cfg, cache=False, device="cpu")
    for layer in cfg.layers:
        assert st[layer].n == ref[layer].n
        assert torch.allclose(st[layer].kk, ref[layer].kk, rtol=1e-5, atol=1e-6)
    assert st.meta["model_fingerprint"] == ref.meta["model_fingerprint"]  # the cache is shared with the full model
    assert read and not any(n.startswith(above) or "lm_head" in n for n in read)


def test_partial_model_errors(tmp_path):
    from zu_fast.model.partial import load_partial_model

    model, _ = llama()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ZuFastError, match="asked for 9 layers"):
        load_partial_model(tmp_path / "m", 9)
    with pytest.raises(ZuFastError, match="no config.json"):
        zu_fast.collect_stats(str(tmp_path / "nothing"), None, ["a b"], _cfg(), cache=False)
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ZuFastError, match="safetensors"):
        load_partial_model(tmp_path / "m", 2)
    model.save_pretrained(tmp_path / "m")
    part = load_partial_model(tmp_path / "m", 2)
    assert len(part.model.layers) == 2 and part.config.num_hidden_layers == 2
    assert part.lm_head.weight.device.type == "meta" and part.zu_fast_partial["total_layers"] == 4
    assert torch.equal(part.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
