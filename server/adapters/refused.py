"""Every PEFT type peftserve does not serve, and why: the message an upload or load of one gets.

A type listed here that a method in methods.METHODS reads is served: the method wins. Every
value of `peft.PeftType` is either read by a method or listed here (tests/server/adapters/
test_refused.py holds that), so an adapter of any PEFT type gets a reason, not a bare "unknown".
"""

from __future__ import annotations

DENSE = (
    "its served form is a dense per-layer weight delta (a weight-sized matrix per layer and adapter), "
    "which cannot be batched cheaply"
)
ROUTING = (
    "it routes each token through a learned network over several adapters, which peftserve does not batch"
)
NOT_YET = "peftserve has no batched form for it yet"

REASONS: dict[str, str] = {
    "LOHA": DENSE,
    "LOKR": DENSE,
    "FOURIERFT": DENSE,
    "WAVEFT": DENSE,
    "SHIRA": DENSE,
    "HIRA": DENSE,
    "C3A": DENSE,
    "GLORA": DENSE,
    "MISS": DENSE,
    "OSF": DENSE,
    "RANDLORA": DENSE,
    "SUPERTUNING": DENSE,
    "HRA": "its Householder reflections rotate the whole weight: served, that is a dense per-layer matrix",
    "BOFT": (
        "its butterfly product of rotations and output scale is, served, a dense per-layer matrix "
        "(OFT, its block-diagonal case, is served)"
    ),
    "XLORA": ROUTING,
    "POLY": ROUTING,
    "ADAPTION_PROMPT": "it adds gated attention over learned prompts in the top layers; " + NOT_YET,
    "MULTITASK_PROMPT_TUNING": "its soft prompt depends on a task id per request; " + NOT_YET,
    "CPT": "its prompt and loss depend on context examples per request; " + NOT_YET,
    "CARTRIDGE": NOT_YET,
    "SHADOW": "it runs a parallel shadow network beside the decoder; " + NOT_YET,
    **{
        name: NOT_YET
        for name in (
            "ADAMSS", "BEFT", "DEFT", "DELORA", "FROD", "GRALORA", "LILY", "PEANUT",
            "PSOFT", "PVERA", "ROAD", "TINYLORA", "UNILORA", "VBLORA",
        )
    },
}  # fmt: skip

MERGE_HINT = (
    "merge it into the base model instead (PEFT: PeftModel.from_pretrained(base, folder).merge_and_unload()"
    ".save_pretrained(out)) and serve that folder with --model; see README, 'Adapter methods'"
)


def refusal(peft_type: str) -> str | None:
    """Why an adapter of this PEFT type is not served, with what to do instead; None if not listed."""
    reason = REASONS.get(peft_type.upper())
    if reason is None:
        return None
    return f"peft_type {peft_type.upper()} is not served: {reason}; {MERGE_HINT}"
