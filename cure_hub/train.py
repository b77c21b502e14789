"""Entry point for ``accelerate launch cure_hub/train.py --model vit_small [...]``.

The same flags work with ``cure-hub train`` and with plain ``python cure_hub/train.py`` (one
process). ``--help`` lists every flag with its default.
"""

import sys

from cure_hub.arguments import parse_train_config
from cure_hub.console import exit_code_of, setup_logging
from cure_hub.trainer import train


def main(argv=None, prog: str = "train.py") -> int:
    config = parse_train_config(argv, prog=prog)
    setup_logging()
    summary = train(config)
    return 128 + summary["signal"] if summary.get("interrupted") else 0  # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(exit_code_of("train.py", main))
