"""CRD's memory bank under DDP: every rank applies every rank's (index, embedding) updates, so after a few
steps each rank holds, bit for bit, the bank of one process with the global batch; the bank and the NCE
normalisers are kept out of DDP's buffer broadcast (``Method.rank_synced_buffers``). In one process, the
bank update is RepDistiller's momentum update (``ContrastMemory``), checked against a per-index loop."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _helpers import free_port, torchrun_env
from _nosync import NoHostSync

import mentor.distill.crd  # noqa: F401  (registers crd)
from mentor.config import load_config
from mentor.distill.losses.contrastive import CRDLoss, MemoryBank
from mentor.engine import Trainer
from mentor.engine.inputs import load_splits
from mentor.methods import BuildInfo, Method, MethodConfig
from mentor.nn.distalign import DistAlignQueue
from mentor.nn.memory import FeatureQueue, LabeledMemoryBank

# -- one process: RepDistiller's update ------------------------------------------------------------


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def contrast_memory_update(memory, index, emb, m):
    """RepDistiller's ``ContrastMemory`` update on nested lists ``memory[view][row][dim]``, one index at a
    time: every new row from the memory as it was before the update (``index_select``), then written in
    batch order (``index_copy_``), so a repeated index keeps its last occurrence's row."""
    old = [[row[:] for row in view] for view in memory]
    for v in range(len(memory)):
        new = [unit([m * a + (1 - m) * e for a, e in zip(old[v][i], emb[v][b])]) for b, i in enumerate(index)]
        for b, i in enumerate(index):
            memory[v][i] = new[b]


@pytest.mark.parametrize("momentum", [0.5, 0.0, 0.9])
def test_the_update_is_repdistillers_momentum_update_index_by_index(momentum):
    g = torch.Generator().manual_seed(11)
    n, dim = 9, 3
    bank = MemoryBank(n, dim, views=2, momentum=momentum, seed=0)
    ref = bank.memory.tolist()
    labels = [-1] * n
    # Step 2 repeats index 4 (a batch straddling an epoch's end), with different embeddings each time.
    for index in ([1, 4, 7], [4, 0, 4], [8, 1, 2]):
        emb = F.normalize(torch.randn(2, len(index), dim, generator=g), dim=-1)
        y = [i % 3 for i in index]
        bank.update(torch.tensor(index), emb, labels=torch.tensor(y))
        contrast_memory_update(ref, index, emb.tolist(), momentum)
        for i, c in zip(index, y):
            labels[i] = c
        for v in range(2):
            for i in range(n):
                assert bank.memory[v, i].tolist() == pytest.approx(ref[v][i], rel=1e-6, abs=1e-7), (index, v, i)
    assert bank.labels.tolist() == labels


def test_rank_synced_buffers_are_those_of_marked_modules():
    class Holder(Method):
        def __init__(self):
            super().__init__(MethodConfig(), torch.nn.Linear(4, 3), BuildInfo(num_classes=3, train_size=10))
            self.contrast = CRDLoss(10, 4, 3)
            self.memory = torch.nn.ModuleDict({"bank": LabeledMemoryBank(6, 4), "queue": FeatureQueue(5, 4, 3)})
            self.align = DistAlignQueue(3, 4)  # small, updated with an all-reduce: left to DDP's broadcast
            self.register_buffer("own", torch.zeros(2))

    assert Holder().rank_synced_buffers() == [
        "contrast.bank.labels", "contrast.bank.memory", "contrast.nce_student.z", "contrast.nce_teacher.z",
        "memory.bank.features", "memory.bank.labels", "memory.queue.features", "memory.queue.probs",
        "memory.queue.ptr"]


# -- two processes ---------------------------------------------------------------------------------

N, DIM, K, T, B = 10, 4, 5, 0.5, 3


def _global_batches():
    """Three global batches of 2 x B rows (index, label, student and teacher embeddings). Indices 4 and 2
    occur on both ranks in one step: the one-process batch keeps the later row, rank 1's."""
    g = torch.Generator().manual_seed(3)
    out = []
    for index in ([1, 4, 7, 4, 2, 9], [2, 3, 5, 6, 0, 2], [9, 8, 1, 0, 4, 5]):
        es, et = (F.normalize(torch.randn(2 * B, DIM, generator=g), dim=1) for _ in range(2))
        index = torch.tensor(index)
        out.append((index, index % 3, es, et))
    return out


def _crd_loss() -> CRDLoss:
    torch.manual_seed(5)  # the same initial bank and sampling seed in every process
    return CRDLoss(N, DIM, K, T, momentum=0.5)


def _standalone(rank: int) -> dict:
    """Rank ``rank``'s rows of every global batch through a CRDLoss: its state and its first scores."""
    crd = _crd_loss()
    scores, original = [], crd.bank.scores

    def record(anchors, view, idx):
        out = original(anchors, view, idx)
        scores.append(out.detach().clone())
        return out

    crd.bank.scores = record
    rows = slice(rank * B, (rank + 1) * B)
    for index, y, es, et in _global_batches():
        with NoHostSync():  # gathers included: the step stays capturable
            crd(es[rows], et[rows], index[rows], y[rows])
    return {"state": crd.state_dict(), "scores": scores[:2]}  # step 0: student-anchored, teacher-anchored


CRD_RUN = ["data.name=digits", "data.val_size=200", "data.augment=none", "model.name=test_mlp",
           "trainer.max_steps=3", "trainer.eval_every=3", "trainer.ckpt_every=3", "trainer.log_every=3",
           "trainer.progress=false", "optim.lr=0.1", "schedule.name=constant"]
# beta 0: the contrastive term trains nothing, so the student follows the one-process run's weights (up to
# rounding) although each rank draws its own negatives; the bank still takes every step's embeddings.
CRD_METHOD = ["method.name=crd", "method.layer=layer1", "method.feat_dim=8", "method.nce_k=64", "method.beta=0"]


def _rank_worker(rank, world, port, out, overrides, splits):
    torchrun_env(rank, world, port)
    dist.init_process_group("gloo")  # the trainer joins this group, and leaves it at the end of fit()
    result = _standalone(rank)
    trainer = Trainer(load_config(None, [f"out_dir={out}", *overrides]), splits=splits)
    result["ddp_buffers"] = sorted(trainer.step_module.named_module_buffers)
    trainer.fit()
    result["run"] = {k: v for k, v in trainer.method.state_dict().items() if k.startswith("contrast.")}
    torch.save(result, f"{out}.{rank}.pt")


def test_two_processes_hold_the_bank_of_one_process_with_the_global_batch(tmp_path):
    splits = load_splits(load_config(None, CRD_RUN).data)
    teacher = tmp_path / "teacher"
    Trainer(load_config(None, [f"out_dir={teacher}", *CRD_RUN, "trainer.max_steps=2"]), splits=splits).fit()
    overrides = [*CRD_RUN, *CRD_METHOD, f"method.teacher={teacher}"]
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path / "ddp"), [*overrides, "data.batch_size=16"], splits),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"ddp.{r}.pt", weights_only=True) for r in range(2)]

    # CRDLoss fed each rank's rows: the bank of every rank is the one-process bank of the global batches.
    one = _crd_loss()
    for index, y, es, et in _global_batches():
        one(es, et, index, y)
    for r in range(2):
        got = ranks[r]["state"]
        torch.testing.assert_close(got["bank.memory"], one.bank.memory, rtol=1e-6, atol=1e-7, msg=f"rank {r}")
        assert torch.equal(got["bank.labels"], one.bank.labels)
    assert int((one.bank.labels >= 0).sum()) == N  # every index was written
    for key, value in ranks[0]["state"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ranks[1]["state"][key]), key  # bit for bit across ranks
    # Z: estimated at the first step over both ranks' scores (each against its own negatives).
    for view, key in enumerate(("nce_student.z", "nce_teacher.z")):
        flat = torch.cat([ranks[r]["scores"][view].flatten() for r in range(2)]).double()
        want = N * (flat / T).exp().mean()
        assert ranks[0]["state"][key].item() == pytest.approx(want.item(), rel=1e-5)
    assert not torch.equal(ranks[0]["scores"][0][:, 1:], ranks[1]["scores"][0][:, 1:])  # per-rank negatives

    # The engine's run: DDP broadcasts none of CRD's state, and after 3 steps of 2 x 16 images both ranks
    # hold the bank of one process with 32.
    single = Trainer(load_config(None, [f"out_dir={tmp_path / 'one'}", *overrides, "data.batch_size=32"]),
                     splits=splits)
    synced = single.method.rank_synced_buffers()
    assert synced == ["contrast.bank.labels", "contrast.bank.memory", "contrast.nce_student.z",
                      "contrast.nce_teacher.z"]
    assert all(not set(synced) & set(rank["ddp_buffers"]) for rank in ranks)
    single.fit()
    want = single.method.state_dict()
    assert int((want["contrast.bank.labels"] >= 0).sum()) == 3 * 32
    for key, value in ranks[0]["run"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ranks[1]["run"][key]), key
    torch.testing.assert_close(ranks[0]["run"]["contrast.bank.memory"], want["contrast.bank.memory"],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0]["run"]["contrast.bank.labels"], want["contrast.bank.labels"])
