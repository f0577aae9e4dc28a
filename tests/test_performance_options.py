"""Speed options give the results they should (docs/performance.md): CPU threads, DataLoader workers, uint8 cached
masks, bf16/fp16 autocast on the CPU, torch.compile, the frozen-prompt cache."""

import copy
import os

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.transforms import Compose

from bundle import workflow
from bundle.engines import AlignmentEvaluator, resolve_amp
from bundle.losses import AlignerLoss
from bundle.networks import AlignerVLM
from tests.conftest import CONFIGS
from tests.test_engines import TINY, _batches, _trainer


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ threads, workers
def test_available_cores_is_within_the_affinity_set():
    n = workflow.available_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_set_threads_explicit_env_and_auto(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workflow.set_threads(1)["num_threads"] == 1 and torch.get_num_threads() == 1
    assert workflow.set_threads("3", name="num_threads")["num_threads"] == 3 and torch.get_num_threads() == 3
    # auto: the free physical cores minus the DataLoader workers, at least one (an idle machine here)
    monkeypatch.setattr(workflow, "available_cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert workflow.set_threads(None, 0) == {"num_threads": 8, "source": "auto", "interop_threads": 1}
    assert workflow.set_threads("auto", 2)["num_threads"] == 6
    assert workflow.set_threads(None, 20)["num_threads"] == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the node's cores
    assert workflow.set_threads(None, 0)["num_threads"] == 2
    # a launcher's (the study runner's) OMP_NUM_THREADS wins over the auto rule, not over an explicit number
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert workflow.set_threads(None, 0)["num_threads"] == 1 and torch.get_num_threads() == 1
    assert workflow.set_threads(2)["num_threads"] == 2
    # cores other processes keep busy are taken off the auto count (one busy core of two: one thread)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(workflow, "available_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.05, 1.0, 0.9))
    assert workflow.set_threads(None, 0) == {
        "num_threads": 1,
        "source": "auto, 1 of 2 cores busy",
        "interop_threads": 1,
    }
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert workflow.set_threads(None, 0)["num_threads"] == 1  # never below one
    monkeypatch.setattr(os, "getloadavg", lambda: (0.6, 0.5, 0.5))
    assert workflow.set_threads(None, 0)["num_threads"] == 2  # a core counts as busy from 0.75 of load
    assert workflow.set_threads(3)["num_threads"] == 3  # an explicit count is kept whatever the load


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, True])
def test_set_threads_rejects_bad_values_naming_the_key(bad, restore_threads):
    with pytest.raises(ValueError, match="num_threads="):
        workflow.set_threads(bad)


def test_num_workers_auto_scales_with_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, expected in ((1, 0), (2, 0), (3, 0), (4, 1), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(workflow, "available_cores", lambda c=cores: c)
        assert workflow.resolve_num_workers("auto") == expected, cores
    assert workflow.resolve_num_workers(None) == 4 and workflow.resolve_num_workers(" Auto ") == 4
    assert workflow.resolve_num_workers(3) == 3 and workflow.resolve_num_workers("2") == 2
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(ValueError, match="num_workers="):
            workflow.resolve_num_workers(bad)


def test_configs_set_threads_first():
    """Training, evaluation and inference set the threads before anything else runs."""
    for files, key in (
        (["train.yaml"], "training"),
        (["train.yaml", "evaluate.yaml"], "evaluating"),
        (["inference.yaml"], "run"),
    ):
        p = ConfigParser()
        p.read_config([os.path.join(CONFIGS, f) for f in files])
        assert p[key][0].startswith("$bundle.workflow.set_threads(@num_threads"), files
        assert p["num_threads"] is None
    p = ConfigParser()
    p.read_config(os.path.join(CONFIGS, "train.yaml"))
    assert (
        p["train#trainer#compile"] == p["validate#evaluator#compile"] == "$bundle.workflow.as_bool(@compile, 'compile')"
    )
    assert p["train#trainer#amp"] == p["validate#evaluator#amp"] == p["final_report#amp"] == "@amp"
    p["num_workers"] = 2
    assert p.get_parsed_content("train#dataloader#persistent_workers") is True
    assert p.get_parsed_content("train#dataloader#num_workers") == 2


def _train_steps(n_threads: int) -> tuple[list[float], dict]:
    torch.set_num_threads(n_threads)
    torch.manual_seed(0)
    net = AlignerVLM(**TINY)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = _trainer(net, opt, _batches(n_batches=3, b=8), AlignerLoss(lambda_al=1.0), grad_clip=1.0)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    torch.manual_seed(1)
    trainer.run()
    return losses, net.state_dict()


def test_thread_count_does_not_change_training(restore_threads):
    """The same losses and weights with 1 and 2 threads (so num_threads is a speed knob, not a result knob)."""
    l1, s1 = _train_steps(1)
    l2, s2 = _train_steps(2)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------ uint8 masks
def test_uint8_cached_masks_give_identical_batches_and_loss(tiny_datalist):
    """configs/train.yaml caches the masks as uint8 (a quarter of float32's memory); after the random transforms and
    `final`, every batch item, and so the loss, is bit-identical to caching float32 masks."""
    out = {}
    for dtype in ("float32", "uint8"):
        p = ConfigParser()
        p.read_config(os.path.join(CONFIGS, "train.yaml"))
        p["datalist_file"] = tiny_datalist
        p["image_size"] = 64
        p["random_alignment"] = True  # the random-shape ablation also rewrites the cached masks
        p["transforms#deterministic#3#dtype"] = dtype
        records = [r for r in p.get_parsed_content("train#records") if r.get("attention")][:6]
        assert records, "the tiny benchmark has annotated training images"
        det = Compose(p.get_parsed_content("transforms#deterministic"))
        cached = [det(r) for r in records]
        assert all(c["attn_mask"].dtype == np.dtype(dtype) for c in cached)
        rnd = Compose(p.get_parsed_content("transforms#random") + p.get_parsed_content("transforms#final"))
        rnd.set_random_state(seed=3)
        out[dtype] = ([rnd(dict(c)) for c in cached for _ in range(2)], sum(c["attn_mask"].nbytes for c in cached))
    (a, bytes_f), (b, bytes_u) = out["float32"], out["uint8"]
    assert bytes_u * 4 == bytes_f
    for x, y in zip(a, b, strict=True):
        for k in ("image", "attn_mask", "label", "align", "attn_available"):
            assert x[k].dtype == y[k].dtype == torch.float32 and torch.equal(x[k], y[k]), k
    assert any(float(x["attn_mask"].sum()) > 0 for x in b)
    torch.manual_seed(0)
    net = AlignerVLM(**{**TINY, "image_size": 64, "classes": tuple(p.get_parsed_content("classes"))}).eval()
    loss_fn = AlignerLoss(lambda_al=1.0)
    losses = []
    for items in (a, b):
        batch = {k: torch.stack([x[k] for x in items]) for k in ("image", "label", "attn_mask", "align")}
        with torch.no_grad():
            losses.append(loss_fn(net(batch["image"]), batch["label"], batch["attn_mask"], batch["align"])["loss"])
    assert torch.equal(losses[0], losses[1])


# ------------------------------------------------------------------------------------------------ AMP
def test_resolve_amp():
    assert resolve_amp(False) is None and resolve_amp(None) is None and resolve_amp("false") is None
    assert resolve_amp(True, "cpu") is torch.bfloat16 and resolve_amp("true", "cuda:1") is torch.float16
    assert resolve_amp("bf16", "cuda") is torch.bfloat16 and resolve_amp("FP16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="amp='half precision'"):
        resolve_amp("half precision")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_evaluates_on_cpu(amp):
    """bf16 (no scaler) and fp16 (GradScaler on the CPU) autocast the CPU step: low-precision logits, finite losses,
    weights that moved; the evaluator autocasts too and returns float32 outputs."""
    torch.manual_seed(0)
    net = AlignerVLM(**TINY)
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = _trainer(net, opt, _batches(n_batches=2), AlignerLoss(lambda_al=1.0), grad_clip=1.0, amp=amp)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(dict(e.state.output)))
    trainer.run()
    dtype = resolve_amp(amp)
    assert (trainer.scaler is not None) == (dtype is torch.float16)
    assert all(o["logits"].dtype == dtype and torch.isfinite(o["loss"]) for o in seen)
    moved = any(not torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # fp16: the scaler skips the steps whose scaled gradients overflow and lowers its scale (65536 at the start)
    assert moved or (trainer.scaler is not None and trainer.scaler.get_scale() < 65536.0)
    ev = AlignmentEvaluator(device=torch.device("cpu"), val_data_loader=_batches(n_batches=1), network=net, amp=amp)
    ev.run()
    assert ev.state.output["pred"].dtype == torch.float32 and ev.amp_dtype is dtype


def test_amp_off_is_the_plain_step():
    """amp false (the CPU default) is exactly the previous fp32 step."""
    res = []
    for amp in (False, "false"):
        torch.manual_seed(0)
        net = AlignerVLM(**TINY)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        trainer = _trainer(net, opt, _batches(n_batches=1), AlignerLoss(lambda_al=1.0), amp=amp)
        torch.manual_seed(1)
        trainer.run()
        assert not trainer.amp and trainer.scaler is None
        res.append(net.state_dict())
    assert all(torch.equal(res[0][k], res[1][k]) for k in res[0])


# ------------------------------------------------------------------------------------------------ fused AdamW
def test_fused_adamw_equals_the_default_within_fp_tolerance():
    states = []
    for fused in (None, True):
        torch.manual_seed(0)
        net = AlignerVLM(**TINY)
        opt = torch.optim.AdamW(workflow.parameter_groups(net, 0.02), lr=1e-3, fused=fused)
        trainer = _trainer(net, opt, _batches(n_batches=2), AlignerLoss(lambda_al=1.0), grad_clip=1.0)
        torch.manual_seed(1)
        trainer.run()
        states.append(net.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------ prompt cache
def test_frozen_prompt_cache_equals_a_fresh_text_pass_and_follows_weight_changes():
    torch.manual_seed(0)
    net = AlignerVLM(**TINY).eval()
    image = torch.randn(2, 1, 32, 32)

    def fresh():
        net.text_encoder.eval()
        with torch.no_grad():
            out = net.text_encoder(input_ids=net.prompt_ids, attention_mask=net.prompt_mask)
        from bundle.text import pool_text

        return pool_text(out, net.prompt_mask, net.text_pooling)

    assert torch.equal(net.prompt_embeddings(), fresh())
    with torch.no_grad():
        cached = net(image)["logits"]
        uncached_net = copy.deepcopy(net)
        uncached_net.prompt_embeddings = fresh
        assert torch.equal(cached, uncached_net(image)["logits"])
    # the cache is not recomputed per step (same tensor), but is after an in-place weight change of the encoder
    first = net.prompt_embeddings()
    assert net.prompt_embeddings() is first
    with torch.no_grad():
        net.text_encoder.embeddings.word_embeddings.weight.mul_(1.5)
    assert not torch.equal(net.prompt_embeddings(), first)
    assert torch.equal(net.prompt_embeddings(), fresh())
    # ... and after loading other weights into the encoder alone (the network's load hook does not see that)
    other = AlignerVLM(**TINY).text_encoder.state_dict()
    net.text_encoder.load_state_dict(other)
    assert torch.equal(net.prompt_embeddings(), fresh())
    # training mode does not change a frozen encoder's prompts (it stays in eval mode: no dropout)
    assert torch.equal(net.train().prompt_embeddings(), fresh())


def test_prompt_cache_stays_fp32_inside_autocast():
    torch.manual_seed(0)
    net = AlignerVLM(**TINY)
    ref = net.prompt_embeddings().clone()
    with torch.no_grad():
        net.text_encoder.embeddings.word_embeddings.weight.mul_(1.0)  # a no-op write: forces a recomputation
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = net.prompt_embeddings()
    assert got.dtype == torch.float32 and torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_compiled_network_equals_eager():
    """``compile`` (MONAI's engine argument, configs/train.yaml ``compile: true``) trains a compiled network whose
    losses and weights equal eager training within fp tolerance; the inductor CPU backend gives the eager forward.
    The engine part uses the aot_eager backend (dynamo + AOT autograd, no C++ build) to stay fast on 2 cores."""
    torch.manual_seed(0)
    net = AlignerVLM(**{**TINY, "dropout": 0.0})
    twin = copy.deepcopy(net)
    batches = _batches(n_batches=2, b=4)
    results = []
    for model, compile_ in ((net, False), (twin, True)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        kw = dict(compile=True, compile_kwargs={"backend": "aot_eager"}) if compile_ else {}
        trainer = _trainer(model, opt, batches, AlignerLoss(lambda_al=1.0), grad_clip=1.0, **kw)
        assert (trainer.network is not model) == compile_  # the engine runs the compiled wrapper ...
        losses = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e, ls=losses: ls.append(e.state.output["loss"]))
        trainer.run()
        results.append((losses, model.state_dict()))  # ... and the module keeps its own state_dict keys
    (l_e, s_e), (l_c, s_c) = results
    assert list(s_e) == list(s_c)
    torch.testing.assert_close(torch.stack(l_e), torch.stack(l_c), rtol=1e-4, atol=1e-5)
    for k in s_e:
        torch.testing.assert_close(s_e[k], s_c[k], rtol=1e-3, atol=1e-5, msg=k)
    twin.eval()
    with torch.no_grad():
        got = torch.compile(twin)(batches[0]["image"])
        ref = twin(batches[0]["image"])
    for k in ("logits", "attn"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
