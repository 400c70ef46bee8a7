"""Which DeepSpeed serves a device, from package metadata alone.

Upstream ``deepspeed`` has had an MLU accelerator since 0.15.2. Cambricon's older stacks ship a fork as
the distribution ``deepspeed-mlu`` (wheel ``deepspeed_mlu``) that installs the import package
``deepspeed`` too, so ``import deepspeed`` cannot tell them apart and transformers' own availability check
(which reads the metadata of ``deepspeed``) misses the fork. We therefore read distribution metadata and
never import DeepSpeed here (importing it probes accelerators and is slow).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata


@dataclass(frozen=True)
class DeepSpeedInfo:
    installed: bool
    distribution: str | None  # "deepspeed", "deepspeed-mlu", ...
    version: str | None
    accelerator: str  # the DS_ACCELERATOR value for the device
    usable: bool  # installed and recent enough for the device
    note: str

    @property
    def flavour(self) -> str:
        if not self.installed:
            return "not installed"
        return "vendor fork" if self.distribution != "deepspeed" else "upstream"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["flavour"] = self.flavour
        return data


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def detect_deepspeed(distributions: tuple[str, ...], accelerator: str, min_version: str) -> DeepSpeedInfo:
    """Find the first installed distribution of ``distributions`` and judge whether it serves the device.

    The minimum version applies to upstream ``deepspeed`` only; vendor forks version independently.
    """
    for dist in distributions:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if dist == "deepspeed" and _version_tuple(version) < _version_tuple(min_version):
            return DeepSpeedInfo(
                True, dist, version, accelerator, False,
                f"deepspeed {version} is older than {min_version}, the first release with a "
                f"{accelerator} accelerator: pip install 'deepspeed>={min_version}'",
            )
        return DeepSpeedInfo(True, dist, version, accelerator, True, f"DS_ACCELERATOR={accelerator}")
    wanted = " or ".join(distributions)
    return DeepSpeedInfo(False, None, None, accelerator, False, f"not installed ({wanted}); pip install 'glmport[deepspeed]'")
