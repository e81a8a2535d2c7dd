"""The exceptions ep-ds-shim raises. Every message says what was found, what was expected and what to do."""

from __future__ import annotations


class EpShimError(RuntimeError):
    """Base class of every error this library raises on purpose."""


class UnsupportedReleaseError(EpShimError):
    """The installed transformers or DeepSpeed release is outside what this library has verified."""


class TargetDriftError(EpShimError):
    """A function the shim would patch no longer has the shape it was verified against; nothing was patched."""


class EPRequestError(EpShimError, ValueError):
    """An expert-parallel load was asked for with arguments that cannot work (raised before any collective)."""


class DeepSpeedGroupsError(EpShimError):
    """DeepSpeed was set up with data-parallel groups that mix ranks holding different experts."""


class ExpertIntegrityError(EpShimError):
    """A rank's expert shards no longer hold what it loaded (e.g. overwritten by a broadcast from rank 0)."""


class RestoreError(EpShimError):
    """Leaving the block found a patched attribute replaced by someone else, so it could not be restored exactly."""


class ScopeError(EpShimError):
    """A block was left in another thread/task than the one that entered it, or out of order."""


class RankDisagreementError(EpShimError):
    """Ranks that must agree (dtype, EP size and group, expert shapes, model type, versions, layout) do not."""


class CollectiveTimeoutError(EpShimError):
    """A rank did not join one of the library's own cross-rank checks in time (it never reached that point)."""


class RankExitedError(CollectiveTimeoutError):
    """A rank's process ended without joining one of the library's own cross-rank checks."""


class ExportError(EpShimError):
    """`ep_ds_shim.save_pretrained` could not write, verify or move the export into place; the target directory
    holds what it held before (or, if the failure came while moving, no model that claims to be complete)."""


class IncompleteSaveError(EpShimError):
    """A save path would write only this rank's part of the experts; nothing was written."""


class CheckpointLayoutError(EpShimError):
    """A DeepSpeed checkpoint cannot be resumed by this job: another model, another ZeRO stage, or an EP size that
    does not divide its experts (another DP x EP layout is converted, not refused)."""


class CheckpointIntegrityError(EpShimError):
    """A DeepSpeed checkpoint is missing, incomplete or not what its record says, or a save did not complete on every
    rank (nothing was put in place)."""
