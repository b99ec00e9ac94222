"""Official key → PEFT parameter mapping, and the checks that make a conversion all-or-nothing.

A `Rule` pairs a template of official keys (`layers.{i}.attention.wq.bias`) with a template of PEFT parameter
names (`base_model.model.model.layers.{i}.self_attn.q_proj.mma_adapter_v2_bias.default`) and a function that turns
the official tensor into ours (RoPE row order, reshapes, norm deltas). Integer fields (`{i}`, `{j}`) match digits,
`{rest}` matches a dotted tail. The same table maps back, to name a missing tensor by its official key.

`map_checkpoint` converts every tensor and collects every problem before raising: official keys that no rule (and
no frozen-weight pattern) knows, PEFT parameters that nothing filled, tensors of the wrong shape. Nothing is
dropped silently; frozen weights (a CLIP encoder, the base LLaMA's own weights) are recognised and counted.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .checkpoint import ConversionError

Converted = torch.Tensor | dict[str, torch.Tensor]
Convert = Callable[[torch.Tensor, dict[str, str]], Converted]  # (official tensor, template fields) → ours


def identity(tensor: torch.Tensor, fields: dict[str, str]) -> torch.Tensor:
    return tensor


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, …
    pattern = "".join(
        re.escape(part) if n % 2 == 0 else (rf"(?P<{part}>[\w.]+)" if part == "rest" else rf"(?P<{part}>\d+)")
        for n, part in enumerate(parts)
    )
    return re.compile(pattern + "$")


@dataclass(frozen=True)
class Rule:
    """`official` key template ↔ `target` PEFT parameter template; `convert(tensor, fields)` gives our tensor, or a
    dict {target name: tensor} when one official tensor fills several parameters (then `target` has more fields)."""

    official: str
    target: str
    convert: Convert = identity
    _official: re.Pattern = field(init=False, repr=False, compare=False)
    _target: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_official", _compile(self.official))
        object.__setattr__(self, "_target", _compile(self.target))

    def match(self, key: str) -> dict[str, str] | None:
        found = self._official.match(key)
        return found.groupdict() if found else None

    def official_name(self, target: str) -> str | None:
        """The official key that fills PEFT parameter `target`, if this rule makes it."""
        found = self._target.match(target)
        return self.official.format(**found.groupdict()) if found else None


def summarise_keys(keys: Iterable[str], limit: int = 40) -> str:
    """Keys that differ only in their integer parts, folded: `layers.{0-3,5}.attention.gate`, one per line."""
    groups: dict[str, list[list[int]]] = defaultdict(list)
    for key in keys:
        numbers = [int(n) for n in re.findall(r"(?<=\.)\d+(?=\.|$)", key)]
        groups[re.sub(r"(?<=\.)\d+(?=\.|$)", "{}", key)].append(numbers)
    lines = []
    for shape, numbers in sorted(groups.items()):
        columns = [sorted(set(column)) for column in zip(*numbers)]
        lines.append("  " + shape.format(*("{" + _ranges(c) + "}" if len(c) > 1 else str(c[0]) for c in columns)))
    more = f"\n  … and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5"."""
    spans, start, previous = [], values[0], values[0]
    for value in values[1:] + [None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    return ",".join(spans)


@dataclass
class Mapped:
    """The converted tensors by PEFT parameter name, and what the conversion read."""

    tensors: dict[str, torch.Tensor]
    read: int  # official tensors converted
    frozen: list[str]  # official keys recognised as frozen weights and left out


def map_checkpoint(
    tensors: dict[str, torch.Tensor],
    rules: list[Rule],
    expected: dict[str, torch.Size],
    *,
    frozen: Iterable[str] = (),
    where: str = "",
    progress: bool = True,
) -> Mapped:
    """Convert `tensors` (official keys) into exactly the PEFT parameters `expected` (name → shape), or raise a
    `ConversionError` that lists every unknown key, every missing tensor and every shape mismatch at once.

    Args:
        frozen: regular expressions of official keys that are frozen weights (never part of an adapter).
        where: names the base and configuration in messages about shapes.
    """
    frozen_patterns = [re.compile(p) for p in frozen]
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unknown, absent, skipped, problems, misshaped = [], [], [], [], set()
    for key in tqdm(sorted(tensors), desc="converting", unit="tensor", disable=not progress, leave=False):
        hit = next(((rule, fields) for rule in rules if (fields := rule.match(key)) is not None), None)
        if hit is None:
            (skipped if any(p.fullmatch(key) for p in frozen_patterns) else unknown).append(key)
            continue
        rule, fields = hit
        try:
            converted = rule.convert(tensors[key], fields)
        except ConversionError as error:
            problems.append(str(error))
            continue
        items = converted.items() if isinstance(converted, dict) else [(rule.target.format(**fields), converted)]
        for name, value in items:
            if name not in expected:
                absent += [key] if key not in absent else []
            elif name in out:
                problems.append(f"`{key}` and `{source[name]}` both fill `{name}`.")
            elif value.shape != expected[name]:
                misshaped.add(name)
                problems.append(
                    f"`{key}` gives `{name}` of shape {tuple(value.shape)}; {where} needs {tuple(expected[name])}."
                )
            else:
                out[name], source[name] = value, key
    missing = [name for name in expected if name not in out and name not in misshaped]
    missing = list(dict.fromkeys(_official_name(name, rules) for name in missing))
    report = []
    if unknown:
        report.append(f"Unknown checkpoint tensors ({len(unknown)}):\n{summarise_keys(unknown)}")
    if absent:
        report.append(f"Checkpoint tensors with no place in {where} ({len(absent)}):\n{summarise_keys(absent)}")
    if missing:
        report.append(f"Missing tensors that {where} needs ({len(missing)}):\n{summarise_keys(missing)}")
    report += problems[:40]
    if report:
        raise ConversionError("Cannot convert the checkpoint; nothing was written.\n" + "\n".join(report))
    return Mapped(out, len(tensors) - len(skipped), skipped)


def _official_name(target: str, rules: list[Rule]) -> str:
    return next((name for rule in rules if (name := rule.official_name(target)) is not None), target)
