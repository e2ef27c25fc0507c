"""Plain-Python references (lists, math, collections.Counter; no torch) of the confidence-threshold family's
pieces, written from the papers and USB's algorithm descriptions one image at a time. The tests compare
mentor.nn's vectorised, stateful modules and the mentor.semi methods against them."""

import math
import statistics
from collections import Counter


def softmax(row, T=1.0):
    top = max(v / T for v in row)
    e = [math.exp(v / T - top) for v in row]
    s = sum(e)
    return [v / s for v in e]


def argmax(row):
    best = 0
    for i, v in enumerate(row):
        if v > row[best]:
            best = i
    return best


def ce(logit_row, target):
    """-log softmax(z)[target] for a class index, -sum q log softmax(z) for a distribution."""
    p = softmax(logit_row)
    if isinstance(target, int):
        return -math.log(p[target])
    return -sum(q * math.log(pi) for q, pi in zip(target, p))


def sharpen(p, T):
    w = [v ** (1.0 / T) for v in p]
    s = sum(w)
    return [v / s for v in w]


def col_mean(rows):
    return [sum(r[c] for r in rows) / len(rows) for c in range(len(rows[0]))]


class FlexRef:
    """FlexMatch's thresholds as USB's hook runs them: mask with the previous classwise_acc, record the
    images over the fixed threshold (a later occurrence overwrites), recount with a Counter."""

    def __init__(self, num_classes, num_unlabeled, p_cutoff, warmup=True, record="fixed"):
        self.C, self.N, self.tau, self.warmup, self.record = num_classes, num_unlabeled, p_cutoff, warmup, record
        self.selected = [-1] * num_unlabeled
        self.acc = [0.0] * num_classes

    def step(self, probs, index):
        mask = []
        for p in probs:
            c = argmax(p)
            b = self.acc[c]
            mask.append(1.0 if max(p) >= self.tau * (b / (2.0 - b)) else 0.0)
        for p, i, keep in zip(probs, index, mask):
            if (max(p) >= self.tau) if self.record == "fixed" else keep:
                self.selected[i] = argmax(p)
        counter = Counter(self.selected)
        if max(counter.values()) < self.N:
            if self.warmup:
                top = max(counter.values())
            else:
                top = max(v for k, v in counter.items() if k != -1)
            self.acc = [counter[c] / top for c in range(self.C)]
        return mask


class FreeRef:
    """FreeMatch's self-adaptive threshold: update the three averages with the batch, then mask."""

    def __init__(self, num_classes, m):
        self.C, self.m = num_classes, m
        self.tau = 1.0 / num_classes
        self.p_model = [1.0 / num_classes] * num_classes
        self.hist = [1.0 / num_classes] * num_classes

    def step(self, probs):
        m, n = self.m, len(probs)
        self.tau = m * self.tau + (1 - m) * sum(max(p) for p in probs) / n
        mean = col_mean(probs)
        self.p_model = [m * a + (1 - m) * b for a, b in zip(self.p_model, mean)]
        counts = Counter(argmax(p) for p in probs)
        self.hist = [m * a + (1 - m) * counts[c] / n for c, a in enumerate(self.hist)]
        top = max(self.p_model)
        return [1.0 if max(p) >= self.tau * self.p_model[argmax(p)] / top else 0.0 for p in probs]


def fairness(logits_s, mask, p_model, hist):
    """FreeMatch's L_f over the kept images, by the formula of the research notes (1.4); 0 if none kept."""
    kept = [softmax(z) for z, w in zip(logits_s, mask) if w > 0]
    if not kept:
        return 0.0
    C = len(p_model)
    counts = Counter(argmax(q) for q in kept)
    hist_s = [counts[c] / len(kept) for c in range(C)]
    mean_q = col_mean(kept)
    s = [mean_q[c] / hist_s[c] if hist_s[c] > 0 else 0.0 for c in range(C)]
    s = [v / sum(s) for v in s]
    p = [p_model[c] / hist[c] for c in range(C)]
    p = [v / sum(p) for v in p]
    return sum(p[c] * math.log(s[c] + 1e-12) for c in range(C))


class SoftRef:
    """SoftMatch's Gaussian weights: update mean and unbiased variance of max p, then weigh."""

    def __init__(self, num_classes, n_sigma, m):
        self.mu, self.var, self.n_sigma, self.m = 1.0 / num_classes, 1.0, n_sigma, m

    def step(self, probs):
        conf = [max(p) for p in probs]
        self.mu = self.m * self.mu + (1 - self.m) * statistics.mean(conf)
        self.var = self.m * self.var + (1 - self.m) * statistics.variance(conf)
        return [math.exp(-(min(c - self.mu, 0.0) ** 2) / (2 * self.var / self.n_sigma ** 2)) for c in conf]


class DARef:
    """Distribution alignment with moving averages (p_model starts at the first batch's mean)."""

    def __init__(self, num_classes, m, target="uniform", p_target=None):
        self.m, self.target = m, target
        self.p_target = list(p_target) if p_target is not None else [1.0 / num_classes] * num_classes
        self.p_model = None

    def step(self, probs, probs_lb=None):
        mean = col_mean(probs)
        if self.p_model is None:
            self.p_model = mean
        else:
            self.p_model = [self.m * a + (1 - self.m) * b for a, b in zip(self.p_model, mean)]
        if self.target == "model":
            self.p_target = [self.m * a + (1 - self.m) * b for a, b in zip(self.p_target, col_mean(probs_lb))]
        out = []
        for p in probs:
            a = [v * (t + 1e-6) / (pm + 1e-6) for v, t, pm in zip(p, self.p_target, self.p_model)]
            out.append([v / sum(a) for v in a])
        return out


def dash_rho(step, rho_hat, gamma, C, rho_min, warmup, every):
    """Dash's threshold at a step after the warm-up, and whether the labels are hard by then."""
    k = max(0, (step - warmup) // every)
    raw = C * gamma ** (-k) * rho_hat
    return max(raw, rho_min), raw <= rho_min


def relative_mask(probs_lb, probs_u, tau):
    cut = tau * sum(max(p) for p in probs_lb) / len(probs_lb)
    return [1.0 if max(p) >= cut else 0.0 for p in probs_u]
