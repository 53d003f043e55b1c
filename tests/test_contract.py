"""Hook-lifecycle contract, parametrised over every registered method x {LLaVA, LLaVA-NeXT} tiny model."""

from __future__ import annotations

import pytest
import torch

import vlm_tools
from vlm_tools._registry import list_methods
from vlm_tools.core.hooks import find_hooks, hook_snapshot

METHODS = [m.name for m in list_methods()]


def _config(tiny, name, tmp_path_factory, **override):
    info = vlm_tools.get_method(name)
    cfg = info.cls.example_config(tiny.model, str(tmp_path_factory.mktemp(name)))
    cfg.update(override)
    return cfg


def _has_budget(name):
    return "keep" in vlm_tools.get_method(name).config_cls.__dataclass_fields__


@pytest.fixture(scope="module")
def base_outputs(tiny):
    """Reference logits of the unwrapped model (computed once; also installs transformers' own capture hooks)."""
    with torch.no_grad():
        single = [tiny.model(**s).logits for s in tiny.singles]
        batch = tiny.model(**tiny.batch).logits
    return single, batch, hook_snapshot(tiny.model)


def _assert_clean(model, snapshot):
    assert find_hooks(model) == []
    assert hook_snapshot(model) == snapshot
    for _, m in model.named_modules():
        assert "forward" not in m.__dict__


@pytest.mark.parametrize("name", METHODS)
def test_unwrap_is_bitwise_and_leaves_no_hooks(tiny, base_outputs, name, tmp_path_factory):
    single, batch, snap = base_outputs
    keys = list(tiny.model.state_dict().keys())
    cls_before = {n: type(m) for n, m in tiny.model.named_modules()}
    wrapped = vlm_tools.wrap(tiny.model, name, **_config(tiny, name, tmp_path_factory))
    with torch.no_grad():
        wrapped(**tiny.batch)
        wrapped.generate(**tiny.singles[0], max_new_tokens=2, do_sample=False)
    assert wrapped.last_trace is not None
    model = wrapped.unwrap()
    assert model is tiny.model
    with torch.no_grad():
        assert torch.equal(model(**tiny.batch).logits, batch)
        assert torch.equal(model(**tiny.singles[0]).logits, single[0])
    _assert_clean(model, snap)
    assert list(model.state_dict().keys()) == keys
    assert {n: type(m) for n, m in model.named_modules()} == cls_before
    wrapped.unwrap()  # idempotent


class _Boom(RuntimeError):
    pass


def _raise(*_args, **_kw):
    raise _Boom("raised inside a hook mid-forward")


@pytest.mark.parametrize("name", METHODS)
def test_exception_mid_forward_leaves_model_clean(tiny, base_outputs, name, tmp_path_factory):
    single, _, snap = base_outputs
    cfg = _config(tiny, name, tmp_path_factory)
    # the user's (not vlm_tools') hook raises in the LLM, after the vision-side hooks of the method have run
    boom = tiny.model.model.language_model.layers[-1].register_forward_pre_hook(_raise)
    try:
        with pytest.raises(_Boom):
            with vlm_tools.attached(tiny.model, name, **cfg) as wrapped:
                with torch.no_grad():
                    wrapped(**tiny.singles[0])
        assert find_hooks(tiny.model) == []
        wrapped = vlm_tools.wrap(tiny.model, name, **cfg)
        with pytest.raises(_Boom), torch.no_grad():
            wrapped.generate(**tiny.singles[0], max_new_tokens=2)
        assert wrapped.context is None  # per-call state cleared in finally
    finally:
        boom.remove()
    with torch.no_grad():  # the wrapper still works after the failed call
        wrapped(**tiny.singles[0])
    wrapped.unwrap()
    _assert_clean(tiny.model, snap)
    with torch.no_grad():
        assert torch.equal(tiny.model(**tiny.singles[0]).logits, single[0])


@pytest.mark.parametrize("name", METHODS)
def test_batch_with_left_padding_equals_single_runs(tiny, name, tmp_path_factory):
    assert tiny.batch["attention_mask"].min() == 0, "the fixture must exercise padding"
    with vlm_tools.attached(tiny.model, name, **_config(tiny, name, tmp_path_factory)) as wrapped, torch.no_grad():
        out = wrapped(**tiny.batch).logits
        mask = wrapped.last_trace
        batch_trace = wrapped.last_trace
        singles = []
        for s in tiny.singles:
            singles.append((wrapped(**s).logits[0], wrapped.last_trace))
    del mask
    for i, (logits, trace) in enumerate(singles):
        n = logits.shape[0]
        assert batch_trace.tokens_after[i] == trace.tokens_after[0]
        for a, b in zip(batch_trace.kept[i], trace.kept[0]):
            assert torch.equal(a, b)
        row = out[i, -n:]  # left padding: the real tokens are the last n positions
        torch.testing.assert_close(row, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_keep_everything_equals_base_model(tiny, base_outputs, name, tmp_path_factory):
    single, batch, _ = base_outputs
    override = {"keep": 10_000} if _has_budget(name) else {}
    cfg = _config(tiny, name, tmp_path_factory, **override)
    cfg.pop("ratio", None)
    with vlm_tools.attached(tiny.model, name, **cfg) as wrapped, torch.no_grad():
        out = wrapped(**tiny.singles[0]).logits
        assert wrapped.last_trace.tokens_after == wrapped.last_trace.tokens_before
        if vlm_tools.get_method(name).kind == "modifier":  # modifiers change the tower by design (e.g. registers)
            assert not torch.equal(out, single[0])
            return
        assert torch.equal(out, single[0])
        torch.testing.assert_close(wrapped(**tiny.batch).logits, batch, atol=1e-5, rtol=1e-5)
        with wrapped.disabled():
            assert torch.equal(wrapped(**tiny.singles[0]).logits, single[0])


@pytest.mark.parametrize("name", METHODS)
def test_budget_is_respected_and_trace_is_sorted(tiny, name, tmp_path_factory):
    cfg = _config(tiny, name, tmp_path_factory)
    with vlm_tools.attached(tiny.model, name, **cfg) as wrapped, torch.no_grad():
        seq = wrapped.generate(**tiny.batch, max_new_tokens=3, do_sample=False)
        trace = wrapped.last_trace
    assert torch.equal(seq[:, : tiny.batch["input_ids"].shape[1]], tiny.batch["input_ids"])
    assert seq.shape[1] == tiny.batch["input_ids"].shape[1] + 3
    assert trace.prefill_ms > 0
    for s, kept_imgs in enumerate(trace.kept):
        assert trace.tokens_after[s] <= trace.tokens_before[s]
        for k in kept_imgs:
            assert k.dtype == torch.long
            assert torch.equal(k, k.sort().values) and k.unique().numel() == k.numel()
            if _has_budget(name) and "keep" in cfg:
                assert k.numel() == min(cfg["keep"], k.numel()) and k.numel() <= cfg["keep"]


def _stage_modules(model):
    """One module per stage where an exception can be raised: a vision block, the projector, an LLM layer."""
    from vlm_tools.core.adapters import get_adapter

    ad = get_adapter(model)
    return {"vision": ad.vision_layers[0], "projector": ad.projector, "llm": ad.lm_layers[-1]}


@pytest.mark.parametrize("stage", ["vision", "projector", "llm"])
@pytest.mark.parametrize("name", METHODS)
def test_exception_at_each_stage_leaves_parameters_and_state_dict(tiny, name, stage, tmp_path_factory):
    """Right after an exception raised inside the vision tower, the projector or the LLM (still wrapped), the model's
    parameters and `state_dict()` are the bare model's (a modifier's swapped-in weights are restored)."""
    model = tiny.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    wrapped = vlm_tools.wrap(model, name, **_config(tiny, name, tmp_path_factory))
    boom = _stage_modules(model)[stage].register_forward_pre_hook(_raise)
    try:
        with pytest.raises(_Boom), torch.no_grad():
            wrapped(**tiny.singles[0])
        assert {n: id(p) for n, p in model.named_parameters()} == params  # the same parameter objects
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)
    finally:
        boom.remove()
        wrapped.unwrap()
    assert find_hooks(model) == []


@pytest.mark.parametrize("name", METHODS)
def test_two_threads_equal_sequential_results(tiny, name, tmp_path_factory):
    """2 threads x 30 calls of one wrapped model give the sequential results (per-thread call contexts)."""
    import threading

    with vlm_tools.attached(tiny.model, name, **_config(tiny, name, tmp_path_factory)) as wrapped, torch.no_grad():
        ref = [wrapped(**s).logits for s in tiny.singles]
        bad: list = []

        def worker(i):
            try:
                for _ in range(30):
                    if not torch.allclose(wrapped(**tiny.singles[i]).logits, ref[i], atol=1e-5):
                        bad.append(i)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion
                bad.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bad == []


@pytest.mark.parametrize("name", METHODS)
def test_generate_with_several_sequences_and_beams(tiny, name, tmp_path_factory):
    """`num_return_sequences` and beam search: every row starts with the caller's prompt, and each returned beam's
    score equals the teacher-forced mean log-probability of its tokens under the same pruning."""
    single = tiny.singles[0]
    n = single["input_ids"].shape[1]
    with vlm_tools.attached(tiny.model, name, **_config(tiny, name, tmp_path_factory)) as wrapped, torch.no_grad():
        sampled = wrapped.generate(**tiny.batch, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        assert sampled.shape[0] == 4
        assert torch.equal(sampled[:, : tiny.batch["input_ids"].shape[1]],
                           tiny.batch["input_ids"].repeat_interleave(2, dim=0))
        out = wrapped.generate(**single, max_new_tokens=3, num_beams=3, num_return_sequences=2, output_scores=True,
                               return_dict_in_generate=True, early_stopping=True)
        for i in range(2):
            new = out.sequences[i, n:]
            ids = torch.cat([single["input_ids"][0], new])[None]
            extra = {k: v for k, v in single.items() if k not in ("input_ids", "attention_mask")}
            logits = wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), forced_tokens=[len(new)],
                             **extra).logits
            logp = torch.log_softmax(logits[0, -len(new) - 1:-1].float(), -1).gather(1, new[:, None])[:, 0]
            assert float(out.sequences_scores[i]) == pytest.approx(float(logp.mean()), abs=1e-4)
