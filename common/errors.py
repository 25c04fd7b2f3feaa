"""The one exception type the command line turns into a one-line message (no traceback)."""


class UserError(Exception):
    """A problem the user can fix: the message names the field, file or rank and the fix."""


class ConfigError(UserError):
    """A configuration problem; the message names the field (`moe.top_k`) and how to fix it."""


def is_peer_failure(err: Exception) -> bool:
    """A collective that failed because another rank died or cannot be reached."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or any(s in text for s in ("Connection closed", "Connection reset",
                                                                         "Gloo", "NCCL", "Timed out", "timed out"))
