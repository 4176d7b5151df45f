"""The cached dense teacher of stage-1 self-distillation (train.teacher_cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import interrupted_and_resumed, random_ids, routed

from skipgpt import SkipGPTError
from skipgpt.train import router_tuning
from skipgpt.train.loop import LoopArgs
from skipgpt.train.losses import distillation_loss
from skipgpt.train.router_tuning import RouterTuningArgs, lm_and_distillation, train_routers
from skipgpt.train.teacher_cache import TeacherCache, teacher_targets, topk_distillation_loss


def _logits(seed: int, shape=(2, 5, 40), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl(temperature):
    teacher, student = _logits(0), _logits(1).requires_grad_()
    full = distillation_loss(student, teacher, temperature)
    (g_full,) = torch.autograd.grad(full, student)
    cached = topk_distillation_loss(student, teacher_targets(teacher, 40, temperature), temperature)
    (g_cached,) = torch.autograd.grad(cached, student)
    torch.testing.assert_close(cached, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_cached, g_full, rtol=1e-5, atol=1e-8)


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    """k cached tokens + one tail outcome: brute force in float64 on the same support."""
    teacher, student, k, t = _logits(2), _logits(3), 7, 1.5
    got = topk_distillation_loss(student, teacher_targets(teacher, k, t), t)
    p = torch.softmax(teacher.double() / t, -1)
    q = torch.softmax(student.double() / t, -1)
    idx = teacher.topk(k, -1).indices
    p_s, q_s = p.gather(-1, idx), q.gather(-1, idx)
    p_c = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    want = (p_c * (p_c.log() - q_c.log())).sum(-1).mean() * t * t
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    full = distillation_loss(student, teacher, t)
    assert 0 < got < full  # a lower bound of the full KL (data processing)


def test_topk_kl_is_zero_when_the_student_is_the_teacher():
    teacher = _logits(4)
    assert float(topk_distillation_loss(teacher, teacher_targets(teacher, 5))) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_teacher_loss_equals_the_live_teacher_loss(temperature):
    """k = vocabulary: the cached path computes the live path's loss, on a miss and on a hit."""
    model, _ = routed("llama", router_init="paper", execute_bias=0.0)
    model.mark_only_routers_trainable()
    model.train()
    ids = random_ids(3, 16, model.config.vocab_size)
    args = RouterTuningArgs(distill_weight=1.0, distill_temperature=temperature)
    cache = TeacherCache(model.config.vocab_size, temperature)
    losses = []
    for teacher_cache in (None, cache, cache):  # live, miss, hit
        torch.manual_seed(5)  # the same Gumbel noise
        loss, terms = lm_and_distillation(model, model, ids, args, teacher_cache=teacher_cache)
        losses.append((float(loss.detach()), terms["kd"]))
    assert (cache.misses, cache.hits) == (3, 3)
    for loss, kd in losses[1:]:  # float32 rounding of log-probabilities of size ~5
        assert loss == pytest.approx(losses[0][0], rel=1e-6)
        assert kd == pytest.approx(losses[0][1], abs=1e-6)


def test_cache_runs_the_teacher_only_for_new_blocks():
    vocab, calls = 40, []

    def teacher(ids):
        calls.append(ids.clone())
        return torch.stack([_logits(int(r.sum()), shape=(ids.shape[1], vocab)) for r in ids])

    cache = TeacherCache(top_k=4)
    a, b, c = (torch.full((6,), v) for v in (1, 2, 3))
    first = cache.targets(torch.stack([a, b]), teacher)
    second = cache.targets(torch.stack([b, c, a]), teacher)
    assert [x.tolist() for x in calls] == [[a.tolist(), b.tolist()], [c.tolist()]]
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 3)
    assert second.values.shape == (3, 6, 4) and second.indices.dtype == torch.int64
    assert torch.equal(second.values[0], first.values[1]) and torch.equal(second.indices[2], first.indices[0])
    want = teacher_targets(teacher(torch.stack([c])), 4)
    torch.testing.assert_close(second.lse[1], want.lse[0])


def test_cache_is_bounded_and_keyed_by_identity():
    teacher = lambda ids: _logits(0, shape=(*ids.shape, 40))  # noqa: E731
    row_bytes = 6 * (4 * 4 + 4 * 4) + 6 * 4  # values fp32 + ids int32 + lse, per block of 6 tokens
    cache = TeacherCache(top_k=4, max_bytes=2 * row_bytes)
    for v in range(3):
        cache.targets(torch.full((1, 6), v), teacher)
    assert len(cache) == 2 and cache.nbytes == 2 * row_bytes
    cache.targets(torch.full((1, 6), 0), teacher)  # the oldest was dropped: computed again
    assert cache.misses == 4
    block = torch.arange(6)
    assert TeacherCache(4, identity="a").key(block) != TeacherCache(4, identity="b").key(block)
    assert TeacherCache(4).key(block) != TeacherCache(8).key(block)
    assert TeacherCache(4).key(block) != TeacherCache(4, temperature=2.0).key(block)
    with pytest.raises(SkipGPTError, match="top_k must be an integer >= 1"):
        TeacherCache(0)
    with pytest.raises(SkipGPTError, match="teacher_cache must be an integer >= 0"):
        RouterTuningArgs(teacher_cache=-1)


def test_resume_with_a_teacher_cache_gives_the_same_next_step_loss(tmp_path, monkeypatch):
    """8 blocks, batch 4: every block is revisited from step 2 on, so the uninterrupted run
    reads the cache where the resumed one (an empty cache) runs the teacher again."""
    caches = []
    make = router_tuning.make_teacher_cache
    monkeypatch.setattr(router_tuning, "make_teacher_cache", lambda *a: caches.append(make(*a)) or caches[-1])
    blocks = random_ids(8, 24, 259)
    loop = LoopArgs(max_steps=6, batch_size=4, lr=1e-2, save_every=3)
    tuning = RouterTuningArgs(distill_weight=1.0, teacher_cache=16, calibrate_blocks=0)
    full, _ = routed("llama", target_sparsity=0.3)
    h_full = train_routers(full, blocks, tmp_path / "full", loop, tuning, progress=False)["history"]
    assert caches[0].hits == 16 and caches[0].misses == 8

    h_res = interrupted_and_resumed(blocks, tmp_path / "part", loop, tuning, target_sparsity=0.3)
    assert caches[-1].misses == 8 and caches[-1].hits == 4  # steps 3, 4, 5 from an empty cache
    for a, b in zip(h_full[3:], h_res[3:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-5, abs=1e-8)


def test_cache_folder_is_reused_by_a_later_run(tmp_path):
    calls = []

    def teacher(ids):
        calls.append(len(ids))
        return _logits(len(calls), shape=(*ids.shape, 40))

    ids = torch.stack([torch.arange(6), torch.arange(6) + 1])
    first = TeacherCache(4, identity="m", directory=tmp_path).targets(ids, teacher)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and calls == [2]
    again = TeacherCache(4, identity="m", directory=tmp_path)  # a new run: empty memory, same folder
    second = again.targets(ids, teacher)
    assert calls == [2] and again.hits == 2
    for f in ("values", "indices", "lse"):
        assert torch.equal(getattr(first, f), getattr(second, f))
    TeacherCache(4, identity="other", directory=tmp_path).targets(ids, teacher)  # another model
    assert calls == [2, 2]
    torn = tmp_path / f"{again.key(ids[0])}.safetensors"
    torn.write_bytes(torn.read_bytes()[:20])  # a torn file is a miss, computed again
    TeacherCache(4, identity="m", directory=tmp_path).targets(ids, teacher)
    assert calls == [2, 2, 1]
    full = TeacherCache(4, identity="new", directory=tmp_path / "small", max_disk_bytes=1)
    full.targets(ids, teacher)  # over its size: computes, keeps in memory, writes nothing
    assert list((tmp_path / "small").iterdir()) == [] and len(full) == 2


def test_teacher_cache_flags_reach_the_stage1_args():
    from skipgpt.cli import build_parser
    from skipgpt.commands.train_router import tuning_args_from_args

    argv = ["train-router", "--model", "random:llama", "--output", "x"]
    assert tuning_args_from_args(build_parser().parse_args(argv)).teacher_cache == 0  # off by default
    args = build_parser().parse_args([*argv, "--teacher-cache", "32", "--teacher-cache-dir", "tc"])
    tuning = tuning_args_from_args(args)
    assert (tuning.teacher_cache, tuning.teacher_cache_dir) == (32, "tc")
    demo = build_parser().parse_args(["demo", "--teacher-cache", "8"])
    assert tuning_args_from_args(demo).teacher_cache == 8
