"""SoC (class transition tracking, k-medoids over the classes, confidence-chosen soft labels) and RKD on
unlabelled data: every formula against a plain-Python computation one image (or one pair) at a time and
hand-worked examples, state over several steps, exact state_dict round trips, no host synchronisation in a
step, real runs on the UCI digits that train, save and resume bitwise, and DDP equal to one process."""

import math

import pytest
import torch
from _helpers import BNNet, fit_until_signal  # noqa: F401  (registers test_bncnn, test_mlp)
from _nosync import NoHostSync
from _ssl_reference import argmax, ce, softmax
from _ssl_runs import DDP_RUN as SSL_DDP_RUN
from _ssl_runs import RUN, resumes_bitwise
from torch import nn

from mentor.config import ConfigError, load_config
from mentor.engine import Trainer
from mentor.methods import METHODS, BuildInfo, StepContext
from mentor.nn.transitions import ClassTransitions, class_similarity, kmedoids
from mentor.semi.rkd_unlabeled import relation_loss

pytest.importorskip("sklearn")  # the digits

# -- plain-Python references -------------------------------------------------------------------------------


def ref_kmedoids(A, medoids, max_rounds=2000):
    """SoC's k-medoids over the classes as the authors' ``kmeans`` runs it, on lists: assign every class that
    is not a medoid to the most similar medoid (first on ties), pick in each cluster (medoid first, then the
    members in class order) the first class with the largest sum of transitions to its cluster, repeat until
    the set of medoids stays, then partition with the final medoids. Returns (medoids, assignment, rounds)."""
    C = len(A)
    S = [[(A[x][y] + A[y][x]) / 2 for y in range(C)] for x in range(C)]

    def clusters_of(m):
        cl = [[c] for c in m]
        for x in range(C):
            if x in m:
                continue
            sims = [S[x][c] for c in m]
            cl[sims.index(max(sims))].append(x)
        return cl

    medoids, rounds = list(medoids), 0
    while rounds < max_rounds:
        rounds += 1
        new = []
        for members in clusters_of(medoids):
            sums = [sum(A[x][y] for y in members) for x in members]
            new.append(members[sums.index(max(sums))])
        if set(new) == set(medoids):
            break
        medoids = new
    assignment = [0] * C
    for j, members in enumerate(clusters_of(medoids)):
        for x in members:
            assignment[x] = j
    return medoids, assignment, rounds


class TransitionsRef:
    """Class transition tracking one image at a time: a dict of last predictions and a list of per-batch
    count matrices, of which the last ``window`` are summed."""

    def __init__(self, C, window):
        self.C, self.window, self.bank, self.history = C, window, {}, []

    def step(self, preds, index):
        counts = [[0] * self.C for _ in range(self.C)]
        for p, i in zip(preds, index):
            if i in self.bank and self.bank[i] != p:
                counts[self.bank[i]][p] += 1
            self.bank[i] = p
        self.history.append(counts)
        return counts

    def matrix(self):
        kept = self.history[-self.window:]
        return [[sum(h[a][b] for h in kept) for b in range(self.C)] for a in range(self.C)]


class SoCRef:
    """SoC's loss per image: record the weak predictions, re-cluster ``k = calls mod (levels + 1) + 2`` on
    the window's counts, keep the classes of the cluster of ``argmax p`` in clustering
    ``round(max p * levels)``, renormalise, soft cross-entropy on the strong view over all images."""

    def __init__(self, C, alpha, window, lambda_u, starts):
        self.C, self.lambda_u = C, lambda_u
        self.levels = round(C / alpha)
        self.tracker = TransitionsRef(C, window)
        zero = [[0] * C for _ in range(C)]
        self.medoids, self.assign = [], []
        for start in starts:
            m, a, _ = ref_kmedoids(zero, start)
            self.medoids.append(m)
            self.assign.append(a)
        self.calls = 0

    def step(self, L, y, index):
        probs = [softmax(z) for z in L["u_weak"]]
        self.tracker.step([argmax(p) for p in probs], index)
        r = self.calls % (self.levels + 1)
        self.medoids[r], self.assign[r], _ = ref_kmedoids(self.tracker.matrix(), self.medoids[r])
        self.calls += 1
        targets, kept = [], []
        for p in probs:
            cl = self.assign[round(max(p) * self.levels)]
            keep = [1.0 if cl[c] == cl[argmax(p)] else 0.0 for c in range(self.C)]
            q = [pc * kc for pc, kc in zip(p, keep)]
            targets.append([v / sum(q) for v in q])
            kept.append(sum(keep))
        sup = sum(ce(z, t) for z, t in zip(L["x"], y)) / len(y)
        unsup = sum(ce(z, q) for z, q in zip(L["u_strong"], targets)) / len(targets)
        return {"loss": sup + self.lambda_u * unsup, "sup": sup, "unsup": unsup}, sum(kept) / len(kept)


def ref_relation_loss(s, t, relation="cos", pairs="halves", p=2):
    """``||w_T - w_S||_p / n_pairs`` one pair at a time (pairs ``(i, ceil(N/2) + i)``, or all ``i != j``)."""
    n = len(s)

    def w_t(a, b):
        if relation == "cos":
            dot = sum(x * y for x, y in zip(a, b))
            return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
        return 1.0 if argmax(a) == argmax(b) else 0.0

    if pairs == "halves":
        idx = [(i, (n + 1) // 2 + i) for i in range(n // 2)]
    else:
        idx = [(i, j) for i in range(n) for j in range(n) if i != j]
    diffs = [w_t(t[i], t[j]) - sum(x * y for x, y in zip(s[i], s[j])) for i, j in idx]
    return sum(abs(d) ** p for d in diffs) ** (1.0 / p) / len(idx)


# -- k-medoids ---------------------------------------------------------------------------------------------


def test_kmedoids_hand_worked_examples():
    # Two groups, {0, 1, 2} around class 1 and {3, 4}; both starting medoids in the second group. Round 1:
    # 0, 1, 2 are as (un)like 3 as 4 and join slot 0 (the first on ties); the cluster {3, 0, 1, 2} has row
    # sums 0, 2, 4, 2, so class 1 becomes its medoid. Round 2: {1, 0, 2} and {4, 3}; the tie between 4 and
    # 3 keeps the current medoid 4. (The authors' code would then seed its final lists with the starting
    # medoids [3, 4] and put 3 into cluster 0: its partition [0, 0, 0, 0, 1] drops the converged one.)
    A = torch.zeros(5, 5)
    for a, b, w in ((0, 1, 2), (1, 2, 2), (3, 4, 5)):
        A[a, b] = A[b, a] = w
    m, assign, moved = kmedoids(A, torch.tensor([[3, 4]]), rounds=5)
    assert m.tolist() == [[1, 4]] and assign.tolist() == [[0, 0, 0, 1, 1]] and not moved.any()
    assert ref_kmedoids(A.tolist(), [3, 4])[:2] == ([1, 4], [0, 0, 0, 1, 1])
    # Nothing observed yet: every class that is not a medoid joins the first slot, and no medoid moves.
    m, assign, _ = kmedoids(torch.zeros(5, 5), torch.tensor([[2, 0, 4]]), rounds=3)
    assert m.tolist() == [[2, 0, 4]] and assign.tolist() == [[1, 0, 0, 0, 2]]
    # Asymmetric counts: similarity is the symmetrised matrix, medoid choice uses the rows of A itself.
    A = torch.tensor([[0.0, 6, 0], [0, 0, 1], [0, 1, 0]])
    assert class_similarity(A).tolist() == [[0, 3, 0], [3, 0, 1], [0, 1, 0]]
    m, assign, _ = kmedoids(A, torch.tensor([[1, 2]]), rounds=5)
    # Round 1: 0 joins 1 (S = 3 vs 0); cluster {1, 0}: row sums A[1,0] = 0 and A[0,1] = 6 -> medoid 0.
    # Round 2: 1 joins 0 (S = 3 vs 1); cluster {0, 1}: 6 vs 0, stays 0; cluster {2} stays.
    assert m.tolist() == [[0, 2]] and assign.tolist() == [[0, 0, 1]]


def test_kmedoids_equals_the_reference_on_random_counts_batched_with_padding():
    g = torch.Generator().manual_seed(3)
    C, K = 9, 6
    for trial in range(12):
        A = torch.randint(0, 6, (C, C), generator=g) * (torch.rand(C, C, generator=g) < 0.5)
        A.fill_diagonal_(0)
        ks = [2, 3, 4, 5, 6]
        starts = torch.zeros(len(ks), K, dtype=torch.long)
        valid = torch.zeros(len(ks), K, dtype=torch.bool)
        for r, k in enumerate(ks):
            starts[r, :k] = torch.randperm(C, generator=g)[:k]
            valid[r, :k] = True
        m, assign, moved = kmedoids(A, starts, valid, rounds=40)
        for r, k in enumerate(ks):
            want_m, want_a, rounds = ref_kmedoids(A.tolist(), starts[r, :k].tolist())
            assert rounds < 40
            assert m[r, :k].tolist() == want_m and assign[r].tolist() == want_a, (trial, k)
            assert torch.equal(m[r, k:], starts[r, k:])  # padding untouched
        assert not moved.any()


def test_kmedoids_reports_a_clustering_that_has_not_settled():
    A = torch.zeros(5, 5)
    for a, b, w in ((0, 1, 2), (1, 2, 2), (3, 4, 5)):
        A[a, b] = A[b, a] = w
    m, _, moved = kmedoids(A, torch.tensor([[3, 4]]), rounds=1)  # needs a second round to see it settled
    assert m.tolist() == [[1, 4]] and moved.tolist() == [True]


# -- class transition tracking ----------------------------------------------------------------------------


def test_transitions_equal_a_per_image_loop_over_steps_with_repeats_and_a_wrapping_window():
    C, POOL, WINDOW = 4, 7, 3
    tracker, ref = ClassTransitions(C, POOL, WINDOW), TransitionsRef(C, WINDOW)
    g = torch.Generator().manual_seed(0)
    seen_repeat = False
    for step in range(9):
        index = torch.randint(0, POOL, (6,), generator=g)
        pred = torch.randint(0, C, (6,), generator=g)
        seen_repeat |= index.unique().numel() < 6
        got = tracker.update(pred, index)
        want = ref.step(pred.tolist(), index.tolist())
        assert got.tolist() == want, step
        assert tracker.matrix.tolist() == ref.matrix(), step
        assert tracker.last.tolist() == [ref.bank.get(i, -1) for i in range(POOL)], step
        assert int(tracker.slot) == (step + 1) % WINDOW
    assert seen_repeat and sum(map(sum, ref.matrix())) > 0


def test_transitions_hand_worked_example():
    t = ClassTransitions(3, 4, 2)
    t.update(torch.tensor([0, 1]), torch.tensor([0, 1]))  # first sightings: nothing counted
    assert t.matrix.sum() == 0
    # image 0: 0 -> 2; image 1 twice in the batch: 1 -> 1 (no change), then 1 -> 0
    t.update(torch.tensor([2, 1, 0]), torch.tensor([0, 1, 1]))
    assert t.matrix.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]] and t.last.tolist() == [2, 0, -1, -1]
    t.update(torch.tensor([1]), torch.tensor([0]))  # 2 -> 1
    assert t.matrix.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    t.update(torch.tensor([1]), torch.tensor([3]))  # the window (2 batches) drops the second batch's counts
    assert t.matrix.tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0]]


# -- SoC's step ----------------------------------------------------------------------------------------------

C, B, N, POOL, MAX_STEPS = 6, 5, 10, 12, 12


def make_soc(seed=1, **hp):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, C))
    with torch.no_grad():
        student[1].weight.mul_(3.0)
    torch.manual_seed(seed)
    cls = METHODS.get("soc")
    cfg = cls.Config(name="soc", **{"alpha": 2.0, "num_tracked_batch": 3, "kmedoids_rounds": 40, **hp})
    return cls(cfg, student, BuildInfo(num_classes=C, in_channels=1, image_size=2, unlabeled_size=POOL))


def soc_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    b = {k: torch.randn(n, 1, 2, 2, generator=g) for k, n in (("x_weak", B), ("u_weak", N), ("u_strong", N))}
    b.update(x=b["x_weak"], u=b["u_weak"], y=torch.randint(0, C, (B,), generator=g),
             u_index=torch.randint(0, POOL, (N,), generator=g), index=torch.arange(B))
    return b


def test_soc_step_equals_a_per_image_computation_over_steps():
    method = make_soc(seed=1)
    torch.manual_seed(1)
    levels = round(C / 2.0)
    starts = [torch.randperm(C)[:k].tolist() for k in range(2, levels + 3)]
    ref = SoCRef(C, 2.0, 3, 1.0, starts)
    kept_sizes = set()
    for step in range(MAX_STEPS):
        batch = soc_batch(step)
        with torch.no_grad():
            L = {k: method.student(batch[k]).tolist() for k in ("x_weak", "u_weak", "u_strong")}
        L["x"] = L["x_weak"]
        expected, classes = ref.step(L, batch["y"].tolist(), batch["u_index"].tolist())
        ctx = StepContext(step=step, max_steps=MAX_STEPS)
        out = method.training_step(batch, ctx)
        for key, value in expected.items():
            assert float(out[key].detach()) == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)
        assert float(ctx.diagnostics["soc_classes"]) == pytest.approx(classes, abs=1e-6)
        assert float(ctx.diagnostics["mask_rate"]) == 1.0
        for r in range(levels + 1):
            k = r + 2
            assert method.clusterings.medoids[r, :k].tolist() == ref.medoids[r], (step, r)
            assert method.clusterings.assignment[r].tolist() == ref.assign[r], (step, r)
        assert method.transitions.matrix.tolist() == ref.tracker.matrix()
        kept_sizes.add(classes)
    assert ref.tracker.history and any(map(sum, ref.tracker.matrix()))  # transitions were counted
    assert len(kept_sizes) > 2  # the selection expanded and shrank


def test_soc_soft_label_hand_worked():
    from mentor.semi.soc import ClassClusterings

    torch.manual_seed(0)
    cl = ClassClusterings(4, 2, 5)  # levels 2: k = 2, 3, 4
    cl.assignment.copy_(torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2], [0, 1, 2, 3]]))
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1],      # round(0.8) = 1: k = 3, the cluster of class 0 is {0}
                      [0.2, 0.2, 0.5, 0.1],      # round(1.0) = 1: k = 3, the cluster of class 2 is {2, 3}
                      [0.1, 0.2, 0.3, 0.4],      # round(0.8) = 1: {2, 3}
                      [0.05, 0.05, 0.1, 0.8],    # round(1.6) = 2: k = 4, {3}
                      [0.25, 0.25, 0.25, 0.25],  # round(0.5) = 0 (half to even, as Python): k = 2, {0, 1}
                      [0.75, 0.1, 0.1, 0.05]])   # round(1.5) = 2: {0}
    want = [[1, 0, 0, 0], [0, 0, 5 / 6, 1 / 6], [0, 0, 3 / 7, 4 / 7], [0, 0, 0, 1], [0.5, 0.5, 0, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(cl(p), torch.tensor(want))
    assert cl.keep(p).sum(1).tolist() == [1, 2, 2, 1, 2, 1]


def test_soc_state_round_trips_exactly_and_continues_the_same():
    a = make_soc(seed=1)
    for step in range(4):
        a.training_step(soc_batch(step), StepContext(step=step, max_steps=MAX_STEPS))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = make_soc(seed=7)  # other starting medoids
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    b.load_state_dict(state)
    for k, v in b.state_dict().items():
        assert torch.equal(v, state[k]), k
    for step in range(4, 8):
        oa = a.training_step(soc_batch(step), StepContext(step=step, max_steps=MAX_STEPS))
        ob = b.training_step(soc_batch(step), StepContext(step=step, max_steps=MAX_STEPS))
        assert torch.equal(oa["loss"], ob["loss"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert {"transitions.last", "transitions.counts", "transitions.total", "transitions.slot",
            "clusterings.medoids", "clusterings.assignment", "clusterings.calls"} <= set(state)


def test_soc_step_reads_nothing_back_to_the_host():
    method = make_soc(kmedoids_rounds=3)
    for step in range(3):
        ctx = StepContext(step=torch.tensor(step), max_steps=MAX_STEPS, unlabeled_targets=torch.zeros(N, dtype=int))
        with NoHostSync():
            out = method.training_step(soc_batch(step), ctx)
        assert torch.isfinite(out["loss"])


def test_soc_defaults_and_their_checks():
    cfg = METHODS.get("soc").Config(name="soc")
    assert (cfg.alpha, cfg.num_tracked_batch, cfg.lambda_u, cfg.kmedoids_rounds) == (2.5, 5120, 1.0, 10)
    with pytest.raises(ConfigError, match=r"method\.alpha"):
        make_soc(alpha=1.0)  # round(6 / 1) + 2 = 8 clusters of 6 classes
    for override in ("num_tracked_batch=0", "kmedoids_rounds=0", "alpha=0", "kmedoids_rounds=100000"):
        with pytest.raises(ConfigError, match=rf"method\.{override.split('=')[0]}"):
            load_config(None, ["method.name=soc", f"method.{override}"])
    cls = METHODS.get("soc")
    with pytest.raises(ConfigError, match="unlabelled pool"):
        cls(cls.Config(name="soc"), nn.Linear(4, 10), BuildInfo(num_classes=10))
    with pytest.raises(ConfigError, match=r"method\.num_tracked_batch"):
        cls(cls.Config(name="soc", num_tracked_batch=2**20), nn.Linear(4, 200),
            BuildInfo(num_classes=200, unlabeled_size=10))


# -- RKD on unlabelled data ----------------------------------------------------------------------------------


def test_relation_loss_hand_worked():
    s = torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0]])
    t = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 1]])
    # pairs (0, 2), (1, 3): teacher cosines 0 and 1/sqrt(2), student products 1 and 0
    want = math.sqrt(1 + 0.5) / 2
    assert float(relation_loss(s, t)) == pytest.approx(want, rel=1e-6)
    assert float(relation_loss(s, t, p=1)) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, rel=1e-6)
    # argmax relations: (0, 2): classes 0 vs 1 -> 0; (1, 3): 0 vs 0 -> 1 (first maximum of [1, 1])
    assert float(relation_loss(s, t, "argmax")) == pytest.approx(math.sqrt(1 + 1) / 2, rel=1e-6)


@pytest.mark.parametrize("relation", ["cos", "argmax"])
@pytest.mark.parametrize("pairs", ["halves", "all"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("n", [7, 8])
def test_relation_loss_equals_a_per_pair_loop(relation, pairs, p, n):
    g = torch.Generator().manual_seed(n + p)
    s, t = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    want = ref_relation_loss(s.tolist(), t.tolist(), relation, pairs, p)
    assert float(relation_loss(s, t, relation, pairs, p)) == pytest.approx(want, rel=1e-5)


DIGITS = BuildInfo(num_classes=10, in_channels=1, image_size=8)
TEACHER_RUN = ["data.name=digits", "data.val_size=200", "data.batch_size=32", "data.flip=false", "data.padding=1",
               "model.name=resnet8", "trainer.progress=false", "optim.lr=0.1"]


def train_teacher(out, steps):
    Trainer(load_config(None, [f"out_dir={out}", *TEACHER_RUN, f"trainer.max_steps={steps}",
                               f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}"])).fit()
    return out


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A resnet8 trained on every label of the digits for a few dozen steps (seconds on one thread)."""
    return str(train_teacher(tmp_path_factory.mktemp("rkd") / "teacher", 30))


def make_rkd(teacher, **hp):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        student[1].weight.mul_(8.0)
    cls = METHODS.get("rkd_unlabeled")
    return cls(cls.Config(name="rkd_unlabeled", teacher=teacher, **hp), student, DIGITS)


def rkd_batch(step):
    g = torch.Generator().manual_seed(200 + step)
    b = {k: torch.randn(n, 1, 8, 8, generator=g) for k, n in (("x_weak", 6), ("u_weak", 12), ("u_strong", 12),
                                                                ("u_none", 12))}
    b.update(x=b["x_weak"], u=b["u_weak"], y=torch.randint(0, 10, (6,), generator=g),
             u_index=torch.arange(12), index=torch.arange(6))
    return b


@pytest.mark.parametrize("hp", [{}, {"relation": "argmax", "pairs": "all", "norm": 1, "teacher_view": "weak",
                                     "rkd_lambda": 0.5, "lambda_u": 0.0},
                                {"p_cutoff": 0.6, "rkd_lambda": 2.0}])
def test_rkd_step_equals_a_per_image_computation(digits_teacher, hp):
    method = make_rkd(digits_teacher, **hp)
    c = method.cfg
    masks = []
    for step in range(3):
        batch = rkd_batch(step)
        with torch.no_grad():
            L = {k: method.student(batch[k]).tolist() for k in ("x_weak", "u_weak", "u_strong")}
            T = method.teacher(batch[f"u_{c.teacher_view}"]).tolist()
        probs = [softmax(z) for z in L["u_weak"]]
        mask = [1.0 if max(q) >= c.p_cutoff else 0.0 for q in probs]
        sup = sum(ce(z, t) for z, t in zip(L["x_weak"], batch["y"].tolist())) / 6
        unsup = sum(m * ce(z, argmax(q)) for m, z, q in zip(mask, L["u_strong"], probs)) / 12
        rkd = ref_relation_loss(L["u_weak"], T, c.relation, c.pairs, c.norm)
        out = method.training_step(batch, StepContext(step=step, max_steps=10))
        assert float(out["sup"]) == pytest.approx(sup, rel=1e-5)
        assert float(out["unsup"]) == pytest.approx(unsup, rel=1e-5, abs=1e-7)
        assert float(out["rkd"]) == pytest.approx(rkd, rel=1e-5)
        assert float(out["loss"].detach()) == pytest.approx(sup + c.lambda_u * unsup + c.rkd_lambda * rkd, rel=1e-5)
        masks += mask
    if c.p_cutoff < 0.9:
        assert 0 < sum(masks) < len(masks)


def test_rkd_term_trains_the_student_through_its_weak_view_logits(digits_teacher):
    batch = rkd_batch(0)
    grads = []
    for lam in (0.0, 1.0):
        method = make_rkd(digits_teacher, rkd_lambda=lam)
        out = method.training_step(batch, StepContext(step=0, max_steps=10))
        grads.append(torch.autograd.grad(out["loss"], method.student[1].weight)[0])
    with torch.no_grad():
        t = method.teacher(batch["u_none"])
    alone = torch.autograd.grad(relation_loss(method.student(batch["u_weak"]), t), method.student[1].weight)[0]
    assert alone.abs().sum() > 0
    torch.testing.assert_close(grads[1] - grads[0], alone, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in method.teacher.parameters())


def test_rkd_teacher_is_frozen_and_not_checkpointed(digits_teacher):
    method = make_rkd(digits_teacher)
    assert method.teacher_names() == ["teacher"] and not method.teacher.training
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert not any(k.startswith("teacher.") for k in method.trained_state())
    state = {k: v.clone() for k, v in method.trained_state().items()}
    other = make_rkd(digits_teacher)
    other.load_trained_state(state)
    batch = rkd_batch(1)
    assert torch.equal(method.training_step(batch, StepContext(step=1, max_steps=10))["loss"],
                       other.training_step(batch, StepContext(step=1, max_steps=10))["loss"])


def test_rkd_step_reads_nothing_back_to_the_host(digits_teacher):
    for hp in ({}, {"relation": "argmax", "pairs": "all"}):
        method = make_rkd(digits_teacher, **hp)
        ctx = StepContext(step=torch.tensor(0), max_steps=10, unlabeled_targets=torch.zeros(12, dtype=int))
        with NoHostSync():
            out = method.training_step(rkd_batch(0), ctx)
        assert torch.isfinite(out["loss"])


def test_rkd_defaults_and_their_checks(digits_teacher):
    cfg = METHODS.get("rkd_unlabeled").Config(name="rkd_unlabeled")
    assert (cfg.rkd_lambda, cfg.relation, cfg.pairs, cfg.norm, cfg.teacher_view) == (1e-3, "cos", "halves", 2, "none")
    assert (cfg.p_cutoff, cfg.lambda_u, cfg.hard_label) == (0.95, 1.0, True)
    with pytest.raises(ConfigError, match=r"method\.teacher"):
        make_rkd("")
    for override in ("relation=dot", "norm=3", "rkd_lambda=-1", "teacher_view=strong"):
        with pytest.raises(ConfigError, match=rf"method\.{override.split('=')[0]}"):
            load_config(None, ["method.name=rkd_unlabeled", f"method.{override}"])


def test_the_teacher_loader_moved_down_and_distill_re_exports_it():
    import mentor.distill
    import mentor.distill.teacher
    import mentor.engine.teacher

    assert mentor.distill.load_teacher is mentor.engine.teacher.load_teacher
    assert mentor.distill.teacher.load_teacher is mentor.engine.teacher.load_teacher
    assert mentor.distill.TeacherError is mentor.engine.teacher.TeacherError


# -- real runs through the engine ----------------------------------------------------------------------------



def small_pool(overrides, size=40):
    """The run's splits with an unlabelled pool of ``size`` images, so that images recur within a few steps."""
    import dataclasses

    from mentor.engine.inputs import load_splits

    splits = load_splits(load_config(None, overrides).data)
    return dataclasses.replace(splits, unlabeled=splits.unlabeled.subset(torch.arange(size)))


def run_hp(name, teacher):
    if name == "soc":
        return ["method.num_tracked_batch=4", "method.kmedoids_rounds=4"]
    return [f"method.teacher={teacher}", "method.p_cutoff=0.3", "method.rkd_lambda=0.1"]


@pytest.mark.parametrize("name", ["soc", "rkd_unlabeled"])
def test_trains_saves_and_resumes_bitwise_on_digits(tmp_path, digits_teacher, name):
    splits = small_pool(RUN)

    def cfg(run):
        return load_config(None, [f"out_dir={tmp_path / run}", f"method.name={name}", *RUN,
                                  *run_hp(name, digits_teacher)])

    straight, start, ref, train, saved = resumes_bitwise(cfg, tmp_path, splits,
                                                         state=lambda t: t.method.trained_state())
    assert all(("soc_classes" in e) if name == "soc" else ("rkd" in e and e["rkd"] > 0) for e in train)
    state_keys = [k for k in ref if not k.startswith("student.")]
    assert all(k in saved for k in state_keys) and not any(k.startswith("teacher.") for k in saved)
    assert any(not torch.equal(ref[k], start[k]) for k in state_keys) or not state_keys
    if name == "soc":
        assert (straight.method.transitions.last >= 0).all()  # every image of the pool was recorded
        assert int(straight.method.clusterings.calls) == 6


DDP_RUN = [*SSL_DDP_RUN, "method.name=soc", "method.num_tracked_batch=3", "method.kmedoids_rounds=4"]


def _ddp_soc_worker(rank, world, port, out, splits):
    import torch.distributed as dist
    from _helpers import torchrun_env

    import mentor.engine.trainer as trainer_module

    torchrun_env(rank, world, port)
    dist.init_process_group("gloo")
    trainer_module.shutdown = lambda d, wait=False: None
    t = Trainer(load_config(None, [f"out_dir={out}/soc", *DDP_RUN, "data.batch_size=8"]), splits=splits)
    t.fit()
    torch.save(t.method.state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 10-25 s on 2 cores
def test_ddp_two_ranks_track_and_cluster_as_one_process(tmp_path):
    import torch.multiprocessing as mp
    from _helpers import free_port

    splits = small_pool(DDP_RUN)
    mp.spawn(_ddp_soc_worker, args=(2, free_port(), str(tmp_path), splits), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = Trainer(load_config(None, [f"out_dir={tmp_path / 'one'}", *DDP_RUN, "data.batch_size=16"]), splits=splits)
    one.fit()
    for key, value in one.method.state_dict().items():
        for r in range(2):
            if value.is_floating_point():
                torch.testing.assert_close(ranks[r][key], value, rtol=1e-5, atol=1e-6, msg=f"rank {r} {key}")
            else:
                assert torch.equal(ranks[r][key], value), (r, key)
    assert one.method.transitions.total.sum() > 0 and (one.method.transitions.last >= 0).sum() > 16


# -- learning ---------------------------------------------------------------------------------------------

LEARN = ["data.name=digits", "data.val_size=200", "data.padding=1", "data.flip=false", "model.name=resnet8",
         "data.labels_per_class=4", "data.batch_size=16", "data.unlabeled_ratio=2", "optim.lr=0.05",
         "trainer.max_steps=200", "trainer.eval_every=200", "trainer.ckpt_every=200", "trainer.log_every=50",
         "trainer.progress=false"]


@pytest.mark.slow
def test_soc_learns_the_digits_from_four_labels_per_class(tmp_path):
    summary = Trainer(load_config(None, [f"out_dir={tmp_path / 'soc'}", "method.name=soc", *LEARN])).fit()
    assert summary["test_acc_last"] > 0.6  # chance 0.1


@pytest.mark.slow
def test_rkd_unlabeled_learns_the_digits_from_four_labels_per_class(tmp_path):
    teacher = train_teacher(tmp_path / "teacher", 150)
    summary = Trainer(load_config(None, [f"out_dir={tmp_path / 'rkd'}", "method.name=rkd_unlabeled",
                                         f"method.teacher={teacher}", *LEARN])).fit()
    assert summary["test_acc_last"] > 0.6  # chance 0.1
