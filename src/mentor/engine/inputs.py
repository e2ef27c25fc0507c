"""The step's inputs: every part a method declares (:class:`~mentor.methods.base.Inputs`), drawn on the
device as a pure function of (seed, step) and augmented into the method's named views.

:func:`load_splits` carves the recipe's data into the splits of the protocol: labelled training data
(all of it, a stratified subset, or ``labels_per_class``), the unlabelled pool, the training domains,
the validation split (from the training data or the training domains only) and the named test splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, DataConfig
from ..data import ArrayDataset, DeviceLoader, load_dataset, stratified_split, stratified_subset
from ..data.augment import AUGMENTS, build_augment
from ..data.splits import long_tailed_subset
from ..data.stream import StreamLoader
from ..errors import DataError
from ..methods.base import Inputs
from ..registry import suggest


@dataclass
class Splits:
    """The splits of one run (uint8 images), carved per the protocol.

    ``train`` is the labelled training data (pooled over the training domains; None when the method
    takes no data), ``val`` selects the model, ``test`` is the test split, or the first of ``tests``
    when several named test splits are reported (held-out domains' "in" parts). ``unlabeled`` is the
    unlabelled pool and ``domains`` the training domains' labelled parts, where the recipe has them;
    ``val_parts`` (per training domain), ``oracle`` (held-out domains' "out" parts) and
    ``unlabeled_domains`` (the pool per domain) exist for domain sets.
    """

    train: ArrayDataset | None
    val: ArrayDataset
    test: ArrayDataset
    train_index: Tensor  # positions of ``train`` images in the official training set
    unlabeled: ArrayDataset | None = None
    domains: dict[str, ArrayDataset] | None = None
    tests: dict[str, ArrayDataset] | None = None
    val_parts: dict[str, ArrayDataset] | None = None  # each training domain's holdout ("out") part
    oracle: dict[str, ArrayDataset] | None = None  # each held-out domain's "out" part (the oracle's split)
    unlabeled_domains: dict[str, ArrayDataset] | None = None  # the unlabelled pool, per domain

    def test_splits(self) -> dict[str, ArrayDataset]:
        """The named test splits a run reports (one split named "test" for an ordinary dataset)."""
        return dict(self.tests) if self.tests else {"test": self.test}

    @property
    def reference(self) -> ArrayDataset:
        """The split whose class list, image shape and normalisation the run uses."""
        return self.train if self.train is not None else self.val


def _folder_splits(cfg: DataConfig):
    """(train, test) of an image-folder tree, in memory or streamed."""
    from pathlib import Path

    from ..config import ConfigError
    from ..data.folders import ImageFolder, find_classes
    from ..data.stream import FolderSplit

    if cfg.root is None:
        raise ConfigError("data.root is required for data.name=image_folder (a folder of class sub-folders)")
    root = Path(cfg.root).expanduser()
    if (root / "train").is_dir():
        train_root, test_root = root / "train", Path(cfg.test_root) if cfg.test_root else root / "test"
    else:
        train_root, test_root = root, Path(cfg.test_root) if cfg.test_root else None
    if test_root is None or not test_root.is_dir():
        raise ConfigError(f"image_folder needs a test split: {root}/train and {root}/test, or data.test_root")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {cfg.channels}")
    classes = find_classes(train_root, test_root, empty_classes=cfg.empty_classes)
    untrained = [c for c in classes if not (train_root / c).is_dir()]
    if untrained:
        raise DataError(f"{test_root} has class folder(s) {', '.join(untrained[:5])} that {train_root} lacks: a class "
                        "without training images cannot be learned; add its training images or remove it from the "
                        "test split")
    mode = "L" if cfg.channels == 1 else "RGB"
    train = ImageFolder(train_root, cfg.image_size, classes=classes, mode=mode)
    test = ImageFolder(test_root, cfg.image_size, classes=classes, mode=mode)
    if not cfg.stream:
        full = train.to_array_dataset(root.name)
        test_ds = test.to_array_dataset(root.name)
        test_ds.mean, test_ds.std = full.mean, full.std
        return full, test_ds
    full = FolderSplit(train, num_workers=cfg.num_workers, name=root.name)
    full.mean, full.std = full.estimate_stats()
    return full, FolderSplit(test, mean=full.mean, std=full.std, num_workers=cfg.num_workers, name=root.name)


def _labelled_positions(labels: Tensor, cfg: DataConfig) -> Tensor:
    """Positions (into ``labels``) of the labelled images: all, a stratified subset, or k per class."""
    if cfg.labels_per_class is not None:
        counts = torch.bincount(labels)
        if int(counts.min()) < cfg.labels_per_class:
            small = int(counts.argmin())
            raise ConfigError(
                f"data.labels_per_class={cfg.labels_per_class} is larger than class {small}, which has "
                f"{int(counts.min())} training images after the validation split; lower it (or data.val_size; "
                "for a domain set data.holdout_fraction or data.domain_limit)")
        return stratified_subset(labels, cfg.labels_per_class * len(counts), seed=cfg.label_seed)
    if cfg.subset is not None:
        if cfg.subset > len(labels):
            raise ConfigError(f"data.subset={cfg.subset} is larger than the {len(labels)} training images "
                              "left after the validation split; lower it")
        return stratified_subset(labels, cfg.subset, seed=cfg.split_seed)
    return torch.arange(len(labels))


def _unlabeled_pool(train: ArrayDataset, labelled: int, cfg: DataConfig) -> ArrayDataset | None:
    """The unlabelled pool: the whole training part (labelled images included), long-tailed with
    ``data.unlabeled_imbalance``; None when every image is labelled."""
    if labelled >= len(train):
        return None
    if cfg.unlabeled_imbalance is None:
        return train
    return train.subset(long_tailed_subset(train.labels, cfg.unlabeled_imbalance, seed=cfg.label_seed))


def _known_classes(cfg: DataConfig, classes: list[str]) -> Tensor | None:
    """``data.unknown_classes`` as a map old label -> new label (known classes 0..K-1 in order, unknown
    ones K); None for a closed-set run."""
    if not cfg.unknown_classes:
        return None
    unknown = set()
    for c in cfg.unknown_classes:
        if c in classes:
            unknown.add(classes.index(c))
        elif c.isdigit() and int(c) < len(classes):
            unknown.add(int(c))
        else:
            raise ConfigError(f"data.unknown_classes: {cfg.name} has no class {c!r}.{suggest(c, classes)} Name "
                              f"classes or give indices 0..{len(classes) - 1}: {', '.join(classes)}")
    known = [i for i in range(len(classes)) if i not in unknown]
    if len(known) < 2:
        raise ConfigError(f"data.unknown_classes leaves {len(known)} known class(es) of {cfg.name}: an open-set "
                          "run needs at least two known classes to classify; list fewer unknown classes")
    remap = torch.full((len(classes),), len(known), dtype=torch.long)
    remap[known] = torch.arange(len(known))
    return remap


def _relabel(ds: ArrayDataset, remap: Tensor | None, keep_unknown: bool) -> ArrayDataset:
    """``ds`` with the open-set labels: known classes renumbered; unknown images dropped, or (held-out
    domains) kept with the label K."""
    if remap is None:
        return ds
    k = int(remap.max())
    labels = remap[ds.labels]
    keep = torch.arange(len(labels)) if keep_unknown else torch.nonzero(labels < k).flatten()
    known = [c for i, c in enumerate(ds.classes) if int(remap[i]) < k]
    return ArrayDataset(ds.images[keep], labels[keep], k, ds.name, known, ds.mean, ds.std)


def _domain_splits(cfg: DataConfig, domain_set) -> Splits:
    """DomainBed's protocol: every domain split into "in" and "out" parts, seeded by ``split_seed`` and the
    domain's position in the set. Training domains train on their "in" part and validate on their "out"
    part; held-out domains report their "in" part and keep the "out" part for the oracle. A domain the
    method also trains on without labels (a source-free target) is reported whole."""
    names = domain_set.names()
    tests = domain_set.check_names(cfg.test_domains, "data.test_domains")
    unlabeled = domain_set.check_names(cfg.unlabeled_domains, "data.unlabeled_domains")
    train_names = (domain_set.check_names(cfg.domains, "data.domains") if cfg.domains is not None
                   else [n for n in names if n not in tests])
    if not train_names:
        raise ConfigError(f"data.test_domains holds every domain of {cfg.name} ({', '.join(names)}): "
                          "leave at least one to train on")
    if not tests:
        raise ConfigError(f"data.test_domains is empty: name the held-out domain(s) of {cfg.name}, "
                          f"one or more of {', '.join(names)}")
    stray = [n for n in unlabeled if n not in train_names]
    if stray:
        raise ConfigError(f"data.unlabeled_domains lists {stray}, which this run does not train on (training "
                          f"domains: {', '.join(train_names)}); an unlabelled domain must be a training domain")
    labelled = [n for n in train_names if n not in unlabeled]
    if not labelled:
        raise ConfigError(f"data.unlabeled_domains holds every training domain ({', '.join(train_names)}): keep "
                          "at least one labelled domain")
    remap = _known_classes(cfg, domain_set.classes)

    def in_out(name: str) -> tuple[ArrayDataset, ArrayDataset]:
        ds = domain_set.domains[name]
        tr, ho = stratified_split(ds.labels, cfg.holdout_fraction, seed=cfg.split_seed + 1000 * names.index(name))
        return ds.subset(tr), ds.subset(ho)

    parts, val_parts, pools, positions, offset = {}, {}, {}, [], 0
    for name in train_names:
        inside, outside = (_relabel(p, remap, keep_unknown=False) for p in in_out(name))
        if remap is not None and (len(inside) == 0 or len(outside) == 0):
            raise ConfigError(f"data.unknown_classes leaves training domain {name!r} without images of a known "
                              "class (in its training or holdout part): list fewer unknown classes, or leave that "
                              "domain out with data.domains")
        if name in unlabeled:
            pools[name] = inside
        else:
            keep = _labelled_positions(inside.labels, cfg)
            parts[name], val_parts[name] = inside.subset(keep), outside
            positions.append(keep + offset)
            if len(keep) < len(inside):
                pools[name] = inside
        offset += len(inside)
    tests_in, oracle = {}, {}
    for name in tests:
        if name in train_names:  # a source-free target: adapted to and reported whole
            tests_in[name] = _relabel(domain_set.domains[name], remap, keep_unknown=True)
        else:
            tests_in[name], oracle[name] = (_relabel(p, remap, keep_unknown=True) for p in in_out(name))
    first = parts[labelled[0]]
    pooled = _concat(list(parts.values()), first, f"{cfg.name}:{'+'.join(labelled)}")
    val = _concat(list(val_parts.values()), first, f"{cfg.name}:holdout")
    pool = _concat(list(pools.values()), first, f"{cfg.name}:unlabelled") if pools else None
    if pool is not None and cfg.unlabeled_imbalance is not None:
        pool = pool.subset(long_tailed_subset(pool.labels, cfg.unlabeled_imbalance, seed=cfg.label_seed))
    return Splits(train=pooled, val=val, test=next(iter(tests_in.values())), train_index=torch.cat(positions),
                  unlabeled=pool, domains=parts, tests=tests_in, val_parts=val_parts, oracle=oracle,
                  unlabeled_domains=pools if pools else None)


def _concat(parts: list[ArrayDataset], like: ArrayDataset, name: str) -> ArrayDataset:
    return ArrayDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                        like.num_classes, name, list(like.classes), like.mean, like.std)


def load_splits(cfg: DataConfig) -> Splits:
    """Official train split -> stratified (train, val); labelled subset and unlabelled pool; test.

    A domain set (``data.name`` of :func:`mentor.data.domains.load_domains`) gives per-domain splits."""
    from ..data.domains import is_domain_set, list_domain_sets, load_domains

    if is_domain_set(cfg.name):
        options = {"image_size": cfg.image_size, "channels": cfg.channels} if cfg.name.startswith("domain_") else {}
        if cfg.name == "domain_folder":
            options["empty_classes"] = cfg.empty_classes
        if cfg.domain_limit is not None:
            if cfg.name.startswith("domain_"):
                raise ConfigError(f"data.domain_limit keeps the first images of a generated domain set "
                                  f"(rotated_fmnist, digits_domains); {cfg.name} reads your files: remove the key")
            options["limit"] = cfg.domain_limit
        return _domain_splits(cfg, load_domains(cfg.name, root=cfg.root, **options))
    if cfg.domains or cfg.test_domains:
        raise ConfigError(f"data.domains/data.test_domains need a domain set as data.name, not {cfg.name!r}; "
                          f"domain sets: {', '.join(list_domain_sets())}")
    if cfg.name == "image_folder":
        full, test = _folder_splits(cfg)
    else:
        full = load_dataset(cfg.name, split="train", root=cfg.root)
        test = load_dataset(cfg.name, split="test", root=cfg.root)
    if cfg.val_size >= len(full.labels):
        raise ConfigError(f"data.val_size={cfg.val_size} leaves no training images: {cfg.name} has "
                          f"{len(full.labels)}; lower it")
    if cfg.val_size > 0:
        tr_idx, va_idx = stratified_split(full.labels, cfg.val_size, seed=cfg.split_seed)
    else:
        tr_idx, va_idx = torch.arange(len(full.labels)), torch.arange(0)
    keep = _labelled_positions(full.labels[tr_idx], cfg)
    unlabeled = _unlabeled_pool(full.subset(tr_idx), len(keep), cfg) if not cfg.stream else None
    tr_idx = tr_idx[keep]
    return Splits(train=full.subset(tr_idx), val=full.subset(va_idx), test=test, train_index=tr_idx,
                  unlabeled=unlabeled)


def data_free_splits(cfg: DataConfig, info: dict) -> Splits:
    """Splits of a run that trains on no data: only the real validation and test splits of the dataset
    the source run was trained on, for reporting (never for training)."""
    full = load_dataset(info["dataset"], split="train", root=cfg.root)
    test = load_dataset(info["dataset"], split="test", root=cfg.root)
    _, va_idx = stratified_split(full.labels, min(cfg.val_size, len(full.labels) // 2), seed=cfg.split_seed)
    return Splits(train=None, val=full.subset(va_idx), test=test, train_index=torch.arange(0))


def normalize(x_u8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x_u8.float().div_(255.0) - mean) / std


def stat_tensors(ds: ArrayDataset, device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(ds.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, view), stable across runs and machines."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x9E3779B97F4A7C15 + ((h << 6) & (2**64 - 1)) + (h >> 2))) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h & (2**63 - 1)


def view_augment(name: str, cfg: DataConfig):
    """The augmentation of one view, with the recipe's crop padding and flip where they apply."""
    if name not in AUGMENTS:
        raise ConfigError(f"data.augment: unknown augmentation {name!r}.{suggest(name, AUGMENTS.names())} Known: "
                          f"{', '.join(AUGMENTS.names())}")
    weak = {"padding": cfg.padding, "flip": cfg.flip}
    if name == "weak":
        return build_augment("weak", **weak)
    if name == "strong":
        return build_augment("strong", weak=weak)
    return build_augment(name)


def view_keys(prefix: str, names: tuple[str, ...] | list[str]) -> list[str]:
    """The batch keys of one part's views: ``<prefix>_<name>``, and for a name listed again its
    occurrence number, ``<prefix>_<name>_<k>`` (``("weak", "weak")`` -> ``u_weak``, ``u_weak_1``).

    Every view is its own draw (its generator is seeded with its position), so a name listed twice
    gives two independent views of the same images (the Pi-model's and Mean Teacher's two weak
    views, MixMatch's K augmentations)."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        keys.append(f"{prefix}_{name}" if k == 0 else f"{prefix}_{name}_{k}")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"the views {list(names)} give the batch keys {keys}, some twice: rename a view")
    return keys


class _Part:
    """One stream of the batch: a loader (or one per domain) and the views made of its images."""

    def __init__(self, loaders: list, views: list, prefix: str, tag: int, sizes: list[int] | None = None):
        self.loaders, self.views, self.prefix, self.tag = loaders, views, prefix, tag
        self.keys = view_keys(prefix, [name for name, _ in views])
        # where each domain's images start in the concatenation of the domains (``index``, ``u_index``)
        self.per_domain = sizes is not None  # drawn domain by domain, with ``domain`` / ``u_domain``
        self.offsets = [0]
        for n in (sizes or [])[:-1]:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def steps_per_epoch(self) -> int:
        return max(ld.steps_per_epoch for ld in self.loaders)


class TrainInputs:
    """Draws batch ``step`` (a pure function of seed and step) with every part the method declares.

    Labelled views are ``x_<view>`` (``x`` the first), with ``y`` and ``index``; unlabelled views are
    ``u_<view>`` (``u`` the first) with ``u_index``, and the unlabelled batch's true labels under
    ``_u_y`` (the engine moves them into ``ctx`` for diagnostics; the method never sees them). A view
    name listed again is another independent draw, keyed ``u_<view>_1``, ... (:func:`view_keys`). With
    ``Inputs(domains=True)`` the labelled batch is ``batch_size`` images from each training domain in
    order, with ``domain``.

    Each view has its own generator seeded from (seed, step, part, view), so the same step always gives
    the same pixels, and an image's augmentation does not depend on the DDP rank: the view draws its
    parameters (``sample_params``) for the global batch, laid out as one process would hold it
    (``[domain 0: B*W, domain 1: B*W, ...]``), and each rank applies the rows of its own images
    (positions ``[r*B, (r+1)*B)`` of each domain's block, as :class:`~mentor.data.loader.IndexSchedule`
    deals them out). An augmentation without ``sample_params`` draws for this rank's images only, from
    a generator seeded with the rank as well.
    """

    def __init__(self, splits: Splits, cfg: DataConfig, inputs: Inputs | tuple[str, ...], seed: int, rank: int,
                 world_size: int, device: torch.device, channels_last: bool = False):
        if not isinstance(inputs, Inputs):
            inputs = Inputs(labeled=tuple(inputs))
        self.spec = inputs
        self.seed, self.rank, self.device = seed, rank, device
        self.channels_last = channels_last
        ref = splits.reference
        self.mean, self.std = stat_tensors(ref, device)
        self.parts: list[_Part] = []

        def loader(ds, batch, salt):
            if isinstance(ds, ArrayDataset):
                return DeviceLoader(ds.images, ds.labels, batch, _mix(seed, salt) if salt else seed,
                                    rank=rank, world_size=world_size, device=device)
            return StreamLoader(ds, batch, seed, rank=rank, world_size=world_size, device=device)

        def views(names):
            return [(v, view_augment(cfg.augment if v == "train" else v, cfg)) for v in names]

        if inputs.labeled:
            if inputs.domains:
                if not splits.domains:
                    raise ConfigError(f"this method trains on per-domain batches: data.name must be a domain set "
                                      f"(rotated_fmnist, digits_domains, domain_folder, ...), not {cfg.name!r}")
                doms = list(splits.domains.values())
                loaders = [loader(d, cfg.batch_size, 1 + i) for i, d in enumerate(doms)]
                sizes = [len(d) for d in doms]
            else:
                loaders, sizes = [loader(splits.train, cfg.batch_size, 0)], None
            self.parts.append(_Part(loaders, views(inputs.labeled), "x", 0, sizes))
        if inputs.unlabeled:
            # source-free (no labelled part): the unlabelled target batch is data.batch_size images
            mu_batch = max(1, round(cfg.unlabeled_ratio * cfg.batch_size)) if inputs.labeled else cfg.batch_size
            if inputs.domains and inputs.labeled and splits.unlabeled_domains:
                # per-domain pools (semi-supervised and single-labelled-domain DG): mu * B from each, u_domain
                pools = list(splits.unlabeled_domains.values())
                loaders = [loader(p, mu_batch, 7919 + i) for i, p in enumerate(pools)]
                self.parts.append(_Part(loaders, views(inputs.unlabeled), "u", 1, [len(p) for p in pools]))
            else:
                pool = splits.unlabeled if splits.unlabeled is not None else splits.train
                self.parts.append(_Part([loader(pool, mu_batch, 7919)], views(inputs.unlabeled), "u", 1))

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one pass over the largest stream (1 without data)."""
        return max([p.steps_per_epoch for p in self.parts] or [1])

    def _draw(self, part: _Part, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        if not part.per_domain:
            x, y = part.loaders[0].batch(step)
            return x, y, part.loaders[0].indices(step).to(self.device), None
        xs, ys, idx, dom = [], [], [], []
        for i, (ld, off) in enumerate(zip(part.loaders, part.offsets)):
            x, y = ld.batch(step)
            xs.append(x)
            ys.append(y)
            idx.append(ld.indices(step).to(self.device) + off)
            dom.append(torch.full((len(y),), i, dtype=torch.long, device=self.device))
        return torch.cat(xs), torch.cat(ys), torch.cat(idx), torch.cat(dom)

    def _augment(self, aug, x: Tensor, part: _Part, step: int, view: int) -> Tensor:
        """View ``view`` of this rank's images ``x`` (floats in [0, 1]) at ``step``."""

        def generator(rank: int) -> torch.Generator:
            # The labelled part keeps the seeds (seed, step, rank, view) of a single-stream batch. The
            # rank's place holds 0 where parameters are drawn for the global batch, which leaves the
            # pixels of a one-process run as they were before the draws became global.
            key = (self.seed, step, rank, view) if part.tag == 0 else (self.seed, step, rank, view, part.tag)
            return torch.Generator(device=self.device).manual_seed(_mix(*key))

        sample = getattr(aug, "sample_params", None)
        if sample is None:
            return aug(x, generator(self.rank))
        blocks, world = len(part.loaders), part.loaders[0].world_size
        per_rank = x.shape[0] // blocks
        total = blocks * world * per_rank
        params = sample(total, generator(0))
        for key, value in params.items():
            if value.shape[:1] != (total,):
                raise ValueError(f"{type(aug).__name__}.sample_params gave {key!r} of shape {tuple(value.shape)}: "
                                 "every parameter must have the batch as its first dimension")
        if world > 1:
            # [blocks * W * B, ...] -> this rank's B rows of each block, in the order of x.
            params = {key: value.unflatten(0, (blocks, world, per_rank))[:, self.rank].flatten(0, 1)
                      for key, value in params.items()}
        return aug.apply(x, params)

    def __call__(self, step: int) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        for part in self.parts:
            x_u8, y, index, domain = self._draw(part, step)
            if part.prefix == "x":
                batch.update(y=y, index=index)
                if domain is not None:
                    batch["domain"] = domain
            else:
                batch.update(u_index=index, _u_y=y)
                if domain is not None:
                    batch["u_domain"] = domain
            for i, ((_, aug), key) in enumerate(zip(part.views, part.keys)):
                x = self._augment(aug, x_u8.float().div_(255.0), part, step, i)
                x = (x - self.mean) / self.std
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                batch[key] = x
                if i == 0:
                    batch[part.prefix] = x
        return batch
