"""What a check returns (CheckResult), what a transition's verification returns (GrowthReport), and every
fix text the checks give, in one place so the summary, the pipeline and the tests name the same words."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

FIX_ROPE = "heads must scale with width: multiply n_heads (and n_kv_heads) by the scale factor, keep head_dim and rope_theta"
FIX_ROUTER = "divide the router's widened input weights by the scale factor (W.repeat(1, s) / s)"
FIX_INSERTED_COLLAPSE = "centre the inserted blocks' routers: scale_bilaterally(..., calibration_tokens=batch)"
FIX_SYMMETRY = "raise noise_std (scale_bilaterally's symmetry-breaking noise, relative to each block's RMS; default 0.3)"
FIX_FUNCTIONAL = "see GROWTH_VERIFICATION.md section 4 (debugging layer-wise drift)"
FIX_COLLAPSE = ("initialise the router with small random weights (router_init_std > 0), centred on real hidden "
                "states (dense_to_moe(..., calibration_tokens=batch))")
FIX_RETRAIN_BALANCE = "raise the load-balancing loss coefficient of the MoE phase and retrain it"
FIX_NORM = "tile the RMSNorm weights (w.repeat(s), never repeat_interleave) and keep norm_eps as it was"
FIX_TRAINABILITY = ("start only one factor of each product at zero: an inserted identity block zeroes its output "
                    "projections (attention o_proj, every expert's down_proj) and nothing else, keeping q, k, v, "
                    "gate, up and the norm weights as copies of its source block; a unit zeroed on both sides (o_proj "
                    "and v_proj, down_proj and up_proj, a zero norm weight, a whole head or expert) never receives "
                    "gradient: re-initialise the weights listed")
FIX_PAIR = "pass the model before and after growth"


def norm_fix(config_changes: list[str]) -> str:
    """The fix for a drifting RMSNorm output: name a changed norm_eps when that is what happened."""
    eps = [c for c in config_changes if c.startswith("norm_eps ")]
    return f"restore norm_eps ({eps[0]}): growth must keep it" if eps else FIX_NORM


@dataclass
class CheckResult:
    """One check's verdict. `fix` is what to change ("" when passed); `consequence_of` names the upstream drift
    this failure follows from, when the check's own input already drifted (its fix is then that drift's)."""

    name: str
    passed: bool
    message: str
    metrics: dict = field(default_factory=dict)
    fix: str = ""
    consequence_of: str | None = None
    # The headline figure: what decided the verdict when failed, the main criterion when passed. Passing means
    # value <= limit (a drift, a count of bad units), or value >= limit when higher_is_better (an entropy, a
    # gradient difference). None where no figure applies (a rejected pair, nothing to compare).
    quantity: str = ""  # what value measures, e.g. "max attention-probability drift of cloned heads"
    value: float | None = None
    limit: float | None = None
    higher_is_better: bool = False

    def __str__(self) -> str:
        return f"{'✓ PASSED' if self.passed else '✗ FAILED'}  {self.name}: {self.message}"

    def within_limit(self) -> bool | None:
        """value against limit in the check's direction; None when either is missing."""
        if self.value is None or self.limit is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def to_record(self) -> dict:
        """A JSON-serialisable dict for metrics.jsonl: plain floats, NaN and infinities as null."""
        return {"name": self.name, "passed": bool(self.passed), "message": self.message, "quantity": self.quantity,
                "value": _json_float(self.value), "limit": _json_float(self.limit),
                "higher_is_better": bool(self.higher_is_better), "fix": self.fix,
                "consequence_of": self.consequence_of}


def _json_float(x) -> float | None:
    """A Python float from a float, int, 0-d tensor or numpy scalar; None for None and non-finite values
    (strict JSON has no NaN or Infinity)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class GrowthReport:
    """All checks of one transition, keyed rope, router, symmetry, functional, trainability (or pair when the
    two models are not a grown pair at all)."""

    passed: bool
    results: dict[str, CheckResult]

    def summary(self) -> str:
        bar = "=" * 72
        lines = [bar, "VERIFICATION SUMMARY", bar]
        lines += [str(r) for r in self.results.values()]
        lines.append(bar)
        if self.passed:
            lines += ["✓ ALL CHECKS PASSED", "Model is ready for Phase 3 training."]
            return "\n".join(lines)
        failed = [k for k, r in self.results.items() if not r.passed]
        lines.append(f"✗ {len(failed)} CHECK(S) FAILED: {', '.join(failed)}. Do not train the grown model; fix:")
        listed: list[tuple[str, str]] = []  # (check, fix) in the order printed
        for key in sorted(failed, key=lambda k: self.results[k].consequence_of is not None):  # root causes first
            r = self.results[key]
            cause = f"a consequence of the drift at {r.consequence_of}; " if r.consequence_of else ""
            same = next((k for k, f in listed if r.fix and r.fix in f), None)
            lines.append(f"  - {key}: {cause}{f'fixed by the {same} fix above' if same else r.fix}")
            listed.append((key, r.fix))
        return "\n".join(lines)
