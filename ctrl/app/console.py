"""What `ctrl` prints: its phases, progress bars and metrics. Library notices that say nothing about the run are
dropped here, each by its message and the module that emits it, unless CTRL_VERBOSE=1; the causes that were
ctrl-rec's own are removed where they arise instead (ctrl/app/lightning_cli.py: `CTRLCLI.parse_arguments`,
`quiet_wandb_init`)."""

from __future__ import annotations

import logging
import os
import warnings

# torch >= 2.10 deprecates pytree's LeafSpec, which Lightning builds on every fit (utilities/_pytree.py) and
# which Python's copy machinery instantiates again when a batch structure is copied (copyreg)
LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULES = r"(pytorch_lightning\.utilities\._pytree|copyreg)$"
# Lightning >= 2.6 advertises its cloud logger on every Trainer built without it
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
# the loggers Lightning's rank_zero_info logs through (the last of the two imported is the one used)
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


def verbose() -> bool:
    return os.environ.get("CTRL_VERBOSE", "") not in ("", "0")


def not_the_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LITLOGGER_TIP)


def quiet_console() -> None:
    """Drop the notices above from this process's console (nothing, with CTRL_VERBOSE=1)."""
    if verbose():
        return
    warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATION, category=FutureWarning, module=LEAFSPEC_MODULES)
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).addFilter(not_the_litlogger_tip)  # the same function twice is added once
