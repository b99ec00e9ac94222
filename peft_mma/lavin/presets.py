"""The released LaVIN configurations (`lavin_mma.md` §2, §4, §6): LaVIN-7B and LaVIN-13B differ in the router
temperature only. Each is a dict of `LaVINConfig` fields; its parameter count on the 7B / 13B shapes is the test (§5:
3,781,296 and 5,390,080)."""

from __future__ import annotations

from typing import Any

from ..vision.backbone import CLIP_VIT_L14

PRESETS: dict[str, dict[str, Any]] = {
    "lavin-7b": dict(temperature=10.0, vision_model=CLIP_VIT_L14, vision_feature_every=4),
    "lavin-13b": dict(temperature=5.0, vision_model=CLIP_VIT_L14, vision_feature_every=4),
}
