"""The DT-GRPO reward (paper §3.2.3, eqs. 10-14) and the ST-GRPO baseline (eq. S15), in one place.

Every reward is computed from a :class:`core.trajectory.Trajectory` as the agent loop parsed it
(``Turn.parse_error``, ``Turn.tool_error``, ``Turn.fast``, ``Turn.answer``, ``Turn.tool_result``):
nothing here reads model text, so the reward sees exactly what the protocol's parsers decided.

    R       = b_fast * R_fast + b_rsn * R_rsn + b_tool * R_tool               (eq. 14; 0.1 / 0.5 / 0.4)
    R_fast  = fmt_fast + 1[fmt_fast > -1] * 1[CLS_fast == label]               (eq. 10)
    R_rsn   = fmt_rsn  + 1[fmt_rsn  > -1] * 1[CLS_final == label]              (eq. 11)
    F_tool  = sum_k gamma_k * min(#valid calls of tool k, 1)                   (eq. 12, gamma_k = 0.2)
    R_tool  = F_tool * 1[CLS_final == label]                                   (eq. 13)

fmt is -1 on a wrong format (or, for the reasoning, an invalid tool call) and 0 otherwise (App. B.2).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from core.trajectory import Trajectory

from .configs import RewardConfig


@dataclass
class RewardBreakdown:
    """Every term of the reward of one rollout (logged per step by the GRPO trainer)."""

    fast_fmt: float  # 0 or -1
    fast_correct: bool
    rsn_fmt: float  # 0 or -1
    final_correct: bool
    r_fast: float
    r_rsn: float
    f_tool: float
    r_tool: float
    total: float  # eq. 14 (dt) or eq. S15 (st)
    tool_counts: dict[str, int]  # valid calls per tool

    def to_dict(self) -> dict:
        return asdict(self)


def valid_tool_counts(traj: Trajectory) -> Counter:
    """Valid tool calls per tool: turns whose call the registry executed (tool_result is set)."""
    return Counter(t.tool_result.name for t in traj.turns if t.tool_result is not None)


def fast_format(traj: Trajectory) -> float:
    """-1 if the first-round answer broke ``<CLS><reason>..</reason>`` (on any attempt) or never came."""
    fast_turns = [t for t in traj.turns if t.kind == "fast"]
    if not fast_turns or any(t.parse_error for t in fast_turns) or traj.fast_answer is None:
        return -1.0
    return 0.0


def reasoning_format(traj: Trajectory) -> float:
    """-1 if any later turn broke the format or made an invalid tool call, or no reasoning answer came."""
    rsn = [t for t in traj.turns if t.kind == "reasoning"]
    if not rsn or any(t.parse_error or t.tool_error for t in rsn):
        return -1.0
    if traj.final is None or traj.final.source != "answer":  # e.g. the policy crashed before answering
        return -1.0
    return 0.0


def final_answer(traj: Trajectory) -> str | None:
    """CLS_final: the verdict of the reasoning's <answer>; a fast-answer fallback is not a final answer."""
    if traj.final is None or traj.final.source != "answer":
        return None
    return traj.final.verdict


def reward(traj: Trajectory, label: str, config: RewardConfig | None = None) -> RewardBreakdown:
    """The reward of one rollout against its ground-truth ``label`` ("real" or "spoof")."""
    if label not in ("real", "spoof"):
        raise ValueError(f"label must be 'real' or 'spoof', got {label!r}")
    config = config or RewardConfig()
    fast_fmt = fast_format(traj)
    fast_ok = traj.fast_answer is not None and traj.fast_answer.verdict == label
    rsn_fmt = reasoning_format(traj)
    final_ok = final_answer(traj) == label
    r_fast = fast_fmt + (1.0 if fast_fmt > -1 and fast_ok else 0.0)
    r_rsn = rsn_fmt + (1.0 if rsn_fmt > -1 and final_ok else 0.0)
    counts = valid_tool_counts(traj)
    # The paper prints max[sum_l v_l 1[T_l = T_k], 1] in eq. 12. A diversity reward that pays each distinct
    # tool once needs min (max would pay a tool used 0 times and grow without bound with repeats), so min it is.
    f_tool = sum(config.gamma.get(name, 0.0) * min(n, 1) for name, n in counts.items())
    r_tool = f_tool * (1.0 if final_ok else 0.0)
    if config.kind == "dt":
        total = config.beta_fast * r_fast + config.beta_rsn * r_rsn + config.beta_tool * r_tool
    else:
        total = st_grpo_reward(traj, label)
    return RewardBreakdown(fast_fmt, fast_ok, rsn_fmt, final_ok, r_fast, r_rsn, f_tool, r_tool, total, dict(counts))


def st_grpo_reward(traj: Trajectory, label: str) -> float:
    """ST-GRPO (DeepEyes) baseline, eq. S15: fmt + acc + 1[tool used] * 1[acc > 0]. The rollouts of this
    baseline offer ZoomInTool only (GRPOConfig.reward="st" restricts the tools)."""
    fmt = reasoning_format(traj)
    acc = 1.0 if final_answer(traj) == label else 0.0
    used = 1.0 if traj.tool_calls_used > 0 else 0.0
    return fmt + acc + used * (1.0 if acc > 0 else 0.0)


# --- TRL reward functions ----------------------------------------------------------------------------
# GRPOTrainer calls each with the completions and every dataset column as keyword lists; our rollout adds a
# "trajectory" column (core.trajectory.Trajectory per completion). With reward_weights = (b_fast, b_rsn,
# b_tool), TRL's weighted sum is exactly eq. 14 and it logs each term as rewards/<name>/mean.
def make_reward_funcs(config: RewardConfig) -> tuple[list, list[float]]:
    """(reward functions, their weights) for trl.GRPOTrainer."""

    def _each(fn):
        def wrapped(completions, trajectory, label, **kwargs):
            return [fn(reward(t, lab, config)) for t, lab in zip(trajectory, label, strict=True)]

        return wrapped

    if config.kind == "st":
        st = _each(lambda b: b.total)
        st.__name__ = "st_grpo"
        return [st], [1.0]
    r_fast, r_rsn, r_tool = _each(lambda b: b.r_fast), _each(lambda b: b.r_rsn), _each(lambda b: b.r_tool)
    r_fast.__name__, r_rsn.__name__, r_tool.__name__ = "r_fast", "r_rsn", "r_tool"
    return [r_fast, r_rsn, r_tool], [config.beta_fast, config.beta_rsn, config.beta_tool]
