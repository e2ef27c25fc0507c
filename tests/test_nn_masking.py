"""The confidence-threshold family's shared pieces (mentor.nn.masking, mentor.nn.distalign) against
per-image Python loops (tests/_ssl_reference.py): masks and state over several steps, checkpoint round
trips, a step given as a device tensor, no host synchronisation, and DDP equal to one process."""

import pytest
import torch
import torch.multiprocessing as mp
from _helpers import free_port, torchrun_env
from _nosync import HostSyncError, NoHostSync
from _ssl_reference import (
    DARef,
    FlexRef,
    FreeRef,
    SoftRef,
    dash_rho,
    fairness,
    relative_mask,
)

from mentor.nn import (
    DashThreshold,
    DistAlignEMA,
    FixedThreshold,
    FlexThreshold,
    FreeMatchThreshold,
    SoftMatchWeight,
    freematch_fairness,
    relative_threshold,
)


def batches(steps, n, c, seed=0, scale=3.0):
    """``steps`` batches of ``n`` probability rows over ``c`` classes, confident enough that masks vary."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, c, generator=g, dtype=torch.float64) * scale).softmax(1) for _ in range(steps)]


def rows(t):
    return t.tolist()


# The modules' starting values (1/C) are float32 constants: a float64 module carries their rounding (~1e-8).
TOL = 1e-7


def test_fixed_threshold_by_hand():
    probs = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.05, 0.95], [0.94, 0.06]])
    assert FixedThreshold(0.95)(probs).tolist() == [1.0, 0.0, 1.0, 0.0]  # >=, as FixMatch


@pytest.mark.parametrize("warmup, record", [(True, "fixed"), (False, "fixed"), (True, "flexible")])
def test_flex_threshold_follows_usb_over_steps(warmup, record):
    C, N, tau = 3, 10, 0.7
    g = torch.Generator().manual_seed(1)
    flex, ref = FlexThreshold(C, N, tau, warmup, record).double(), FlexRef(C, N, tau, warmup, record)
    for step, probs in enumerate(batches(6, 8, C, seed=2)):
        index = torch.randint(0, N, (8,), generator=g)
        index[3] = index[6]  # one image twice in the batch: its later occurrence is recorded
        mask = flex(probs, index)
        expected = ref.step(rows(probs), index.tolist())
        assert mask.tolist() == expected, step
        assert flex.selected_label.tolist() == ref.selected, step
        assert flex.classwise_acc.tolist() == pytest.approx(ref.acc, abs=TOL), step
        if step == 0:
            assert expected == [1.0] * 8  # beta = 0 for every class: the threshold starts at 0
    assert any(0 < a < 1 for a in ref.acc)  # a curriculum under way, not a trivial state


def test_flex_threshold_keeps_beta_when_every_entry_holds_one_value():
    flex = FlexThreshold(2, 3, 0.5)
    flex(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]), torch.tensor([0, 1, 2]))
    # every image recorded class 0: USB's `max(counter) < N` guard leaves beta at its start (0)
    assert flex.selected_label.tolist() == [0, 0, 0] and flex.classwise_acc.tolist() == [0.0, 0.0]
    flex(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
    assert flex.selected_label.tolist() == [0, 1, 0] and flex.classwise_acc.tolist() == [1.0, 0.5]


def test_freematch_threshold_follows_the_loop_over_steps():
    C, m = 4, 0.5
    sat, ref = FreeMatchThreshold(C, ema=m).double(), FreeRef(C, m)
    assert float(sat.time_p) == 0.25 and sat.p_model.tolist() == [0.25] * 4  # the paper's 1/C start
    masks = []
    for probs in batches(5, 16, C, seed=3):
        mask = sat(probs)
        masks += mask.tolist()
        assert mask.tolist() == ref.step(rows(probs))
        assert float(sat.time_p) == pytest.approx(ref.tau, abs=TOL)
        assert sat.p_model.tolist() == pytest.approx(ref.p_model, abs=TOL)
        assert sat.label_hist.tolist() == pytest.approx(ref.hist, abs=TOL)
    assert 0 < sum(masks) < len(masks)


def test_freematch_fairness_matches_the_formula_and_is_zero_without_kept_images():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(10, 4, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float64)
    p_model = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    hist = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    got = freematch_fairness(logits, mask, p_model, hist)
    assert float(got) == pytest.approx(fairness(rows(logits), mask.tolist(), p_model.tolist(), hist.tolist()),
                                       rel=1e-6)
    # kept images predict only some classes: the empty histogram bins are scaled by 0, not inf
    assert len({int(i) for i in logits.softmax(1).argmax(1)[mask > 0]}) < 4
    z = logits.clone().requires_grad_(True)
    none = freematch_fairness(z, torch.zeros(10, dtype=torch.float64), p_model, hist)
    none.backward()
    assert float(none.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))  # no NaN from the untaken branch


def test_softmatch_weight_follows_the_loop_over_steps():
    C = 5
    sm, ref = SoftMatchWeight(C, n_sigma=2, ema=0.8).double(), SoftRef(C, 2, 0.8)
    for probs in batches(4, 12, C, seed=5, scale=1.5):
        w = sm(probs)
        assert w.tolist() == pytest.approx(ref.step(rows(probs)), abs=TOL)
        assert float(sm.mu) == pytest.approx(ref.mu, abs=TOL)
        assert float(sm.var) == pytest.approx(ref.var, abs=TOL)
    assert w.min() < 1 and w.max() == 1  # a Gaussian tail below the mean, 1 above it


def test_dash_threshold_schedule_window_and_switch_to_hard_labels():
    warmup, window, every, gamma, C, rho_min = 6, 3, 4, 1.27, 1.0001, 0.05
    dash = DashThreshold(rho_min, gamma, C, warmup, window, every)
    sup = [2.0, 1.8, 1.5, 1.2, 0.9, 0.6, 0.3, 0.1]
    for step, loss in enumerate(sup):
        dash.observe(step, torch.tensor(loss))  # only steps 3, 4, 5 count (the last 3 of the warm-up)
    rho_hat = (1.2 + 0.9 + 0.6) / 3
    assert float(dash.rho_hat) == pytest.approx(rho_hat)
    losses = torch.tensor([0.01, 0.5, 0.9, 1.0, 2.0])
    assert dash(losses, 5).tolist() == [0.0] * 5  # the warm-up keeps nothing
    for step in (6, 9, 10, 13, 14, 30, 60):
        rho, hard = dash_rho(step, rho_hat, gamma, C, rho_min, warmup, every)
        assert float(dash.rho(step)) == pytest.approx(rho, rel=1e-6), step
        assert bool(dash.hard(step)) == hard, step
        assert dash(losses, step).tolist() == [float(v <= rho) for v in losses.tolist()], step
        # the same with the step as a 0-d tensor (a captured step)
        assert dash(losses, torch.tensor(step)).tolist() == dash(losses, step).tolist()
    assert float(dash.rho(6)) == pytest.approx(C * rho_hat) and not bool(dash.hard(6))
    assert float(dash.rho(60)) == pytest.approx(rho_min) and bool(dash.hard(60))


@pytest.mark.parametrize("target", ["uniform", "model", "gt"])
def test_distribution_alignment_follows_the_loop_over_steps(target):
    C, m = 4, 0.7
    gt = [0.1, 0.2, 0.3, 0.4]
    da = DistAlignEMA(C, m, target, torch.tensor(gt, dtype=torch.float64) if target == "gt" else None).double()
    ref = DARef(C, m, target, gt if target == "gt" else None)
    lb = batches(4, 6, C, seed=7)
    for probs, probs_lb in zip(batches(4, 10, C, seed=6), lb):
        aligned = da(probs, probs_lb)
        expected = ref.step(rows(probs), rows(probs_lb))
        assert aligned.tolist() == [pytest.approx(r, abs=TOL) for r in expected]
        assert da.p_model.tolist() == pytest.approx(ref.p_model, abs=TOL)
        assert da.p_target.tolist() == pytest.approx(ref.p_target, abs=TOL)
    assert torch.allclose(aligned.sum(1), torch.ones(10, dtype=torch.float64))


def test_relative_threshold_by_hand():
    probs_lb = torch.tensor([[0.9, 0.1], [0.7, 0.3]])  # mean max p = 0.8
    probs_u = torch.tensor([[0.77, 0.23], [0.75, 0.25], [0.2, 0.8], [0.5, 0.5]])
    assert relative_threshold(probs_lb, probs_u, 0.95).tolist() == [1.0, 0.0, 1.0, 0.0]  # cut 0.76
    assert relative_threshold(probs_lb, probs_u, 0.95).tolist() == relative_mask(rows(probs_lb), rows(probs_u), 0.95)


# -- state: checkpoints, tensor steps, no host synchronisation -------------------------------------------


def make_all(C=4, N=20):
    return {"flex": FlexThreshold(C, N, 0.6), "free": FreeMatchThreshold(C, 0.9), "soft": SoftMatchWeight(C, 2, 0.9),
            "dash": DashThreshold(0.05, 1.27, 1.0001, 2, 2, 1), "align": DistAlignEMA(C, 0.9, "model")}


def run_all(mods, probs, probs_lb, index, step):
    """One step through every stateful piece; returns what each gives."""
    return {"flex": mods["flex"](probs, index), "free": mods["free"](probs), "soft": mods["soft"](probs),
            "dash": (mods["dash"].observe(step, -probs_lb.max(1).values.log().mean()),
                     mods["dash"](-probs.max(1).values.log(), step))[1],
            "align": mods["align"](probs, probs_lb)}


def step_data(step, C=4, N=20):
    g = torch.Generator().manual_seed(100 + step)
    probs = (torch.randn(8, C, generator=g) * 3).softmax(1)
    return probs, (torch.randn(4, C, generator=g) * 3).softmax(1), torch.randint(0, N, (8,), generator=g)


def test_state_round_trips_through_a_checkpoint_and_resumes_exactly():
    a = make_all()
    for step in range(3):
        run_all(a, *step_data(step), step)
    b = make_all()
    for name in a:
        state = a[name].state_dict()
        assert state, name  # every piece keeps its state in buffers
        b[name].load_state_dict({k: v.clone() for k, v in state.items()})
    for step in range(3, 6):
        out_a, out_b = run_all(a, *step_data(step), step), run_all(b, *step_data(step), step)
        for name in a:
            assert torch.equal(out_a[name], out_b[name]), (name, step)
    for name in a:
        for k, v in a[name].state_dict().items():
            assert torch.equal(v, b[name].state_dict()[k]), (name, k)


def test_a_step_given_as_a_tensor_gives_the_same_state():
    a, b = make_all(), make_all()
    for step in range(4):
        out_a = run_all(a, *step_data(step), step)
        out_b = run_all(b, *step_data(step), torch.tensor(step))
        for name in a:
            assert torch.equal(out_a[name], out_b[name]), (name, step)


def test_no_piece_reads_a_value_back_to_the_host():
    # The CPU stand-in for torch.cuda.set_sync_debug_mode: .item(), a Python `if` on a tensor, boolean
    # indexing, bincount, .tolist() raise inside NoHostSync (tests/_nosync.py); the step is a 0-d tensor.
    mods = make_all()
    for t in range(3):
        probs, probs_lb, index = step_data(t)
        with NoHostSync():
            out = run_all(mods, probs, probs_lb, index, torch.tensor(t))
            fair = freematch_fairness(torch.log(probs), out["free"], mods["free"].p_model, mods["free"].label_hist)
            rel = relative_threshold(probs_lb, probs, 0.9)
        assert torch.isfinite(fair) and rel.shape == (8,)
    with pytest.raises(HostSyncError), NoHostSync():  # the tripwire works
        torch.bincount(index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_synchronisation_on_cuda():
    mods = {k: v.cuda() for k, v in make_all().items()}
    data = [[v.cuda() for v in step_data(t)] for t in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(3):
            step_t = torch.full((), t, device="cuda")
            out = run_all(mods, *data[t], step_t)
            freematch_fairness(torch.log(data[t][0]), out["free"], mods["free"].p_model, mods["free"].label_hist)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# -- DDP: each rank holds a slice of the batch, the state is that of one process --------------------------


def _ddp_masking_worker(rank, world, port, path):
    import torch.distributed as dist

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo")
    mods = make_all()
    seen = []
    for t in range(3):
        probs, probs_lb, index = step_data(t)
        rows_u, rows_l = slice(4 * rank, 4 * rank + 4), slice(2 * rank, 2 * rank + 2)
        out = run_all(mods, probs[rows_u], probs_lb[rows_l], index[rows_u], t)
        out["rel"] = relative_threshold(probs_lb[rows_l], probs[rows_u], 0.9)
        seen.append(out)
    torch.save({"out": seen, "state": {k: m.state_dict() for k, m in mods.items()}}, f"{path}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_hold_the_state_of_one_process_with_the_global_batch(tmp_path):
    mp.spawn(_ddp_masking_worker, args=(2, free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    one = make_all()
    for t in range(3):
        probs, probs_lb, index = step_data(t)
        whole = run_all(one, probs, probs_lb, index, t)
        whole["rel"] = relative_threshold(probs_lb, probs, 0.9)
        for name, value in whole.items():
            got = torch.cat([ranks[r]["out"][t][name] for r in range(2)])
            assert torch.allclose(got, value, atol=1e-6), (name, t)
    for name, m in one.items():
        for k, v in m.state_dict().items():
            for r in range(2):
                assert torch.allclose(ranks[r]["state"][name][k].float(), v.float(), atol=1e-6), (name, k, r)
