"""Which DeepSpeed serves a device, from package metadata alone.

Upstream ``deepspeed`` has CUDA, CPU and (since 0.15.2) MLU accelerators. Cambricon's older stacks ship a
fork as the distribution ``deepspeed-mlu`` (wheel ``deepspeed_mlu``) that installs the import package
``deepspeed`` too, so ``import deepspeed`` cannot tell them apart and transformers' own availability check
(which reads the metadata of ``deepspeed``) misses the fork. We therefore read distribution metadata and
never import DeepSpeed here (importing it probes accelerators and is slow).

Each backend names the distributions that serve it, best first (:attr:`glmport.backend.Backend.
deepspeed_distributions`) and the ``DS_ACCELERATOR`` value; :func:`detect_deepspeed` judges what is
installed against that, and says what to install when it does not fit: nothing installed, upstream too
old for the device, or a flavour that serves another device (the MLU fork on a CUDA host).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata

# Every distribution known to install the import package ``deepspeed``.
KNOWN_DISTRIBUTIONS = ("deepspeed", "deepspeed-mlu", "deepspeed_mlu")


@dataclass(frozen=True)
class DeepSpeedInfo:
    installed: bool  # a distribution this device can use is installed
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

    def describe(self) -> str:
        """One line for ``glmport env``: flavour, version, accelerator, or why it cannot run."""
        if not self.usable:
            return f"cannot run: {self.note}"
        return f"{self.distribution} {self.version} ({self.flavour}), DS_ACCELERATOR={self.accelerator}"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def detect_deepspeed(distributions: tuple[str, ...], accelerator: str, min_version: str) -> DeepSpeedInfo:
    """Find the first installed distribution of ``distributions`` and judge whether it serves the device.

    The minimum version applies to upstream ``deepspeed`` only; vendor forks version independently.
    """
    for dist in distributions:
        version = _installed(dist)
        if version is None:
            continue
        if dist == "deepspeed" and _version_tuple(version) < _version_tuple(min_version):
            return DeepSpeedInfo(
                True, dist, version, accelerator, False,
                f"deepspeed {version} is older than {min_version}, the first release with a "
                f"{accelerator} accelerator: pip install 'deepspeed>={min_version}'",
            )
        return DeepSpeedInfo(True, dist, version, accelerator, True, f"DS_ACCELERATOR={accelerator}")
    wanted = " or ".join(distributions)
    install = "pip install 'glmport[deepspeed]'" if "deepspeed" in distributions else f"install {distributions[0]}"
    foreign = [(dist, version) for dist in KNOWN_DISTRIBUTIONS if dist not in distributions
               and (version := _installed(dist)) is not None]
    if foreign:
        dist, version = foreign[0]
        return DeepSpeedInfo(False, None, None, accelerator, False,
                             f"{dist} {version} is installed, a DeepSpeed flavour for another device; this device "
                             f"({accelerator}) needs {wanted}: pip uninstall {dist}, then {install}")
    return DeepSpeedInfo(False, None, None, accelerator, False, f"not installed ({wanted}); {install}")
