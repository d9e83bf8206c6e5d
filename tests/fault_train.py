"""`python tests/fault_train.py [--slow-checkpoint SECONDS] [--nan-loss SPEC] -- HYDRA_OVERRIDES...`: train.py with
test doubles installed (production code reads no fault variables). Used by tests/test_faults.py and bench/soak.py
to kill a run at a known point.

  --slow-checkpoint S  every checkpoint waits S seconds after its models are written and before it is marked
                       complete (CheckpointManager.before_commit), so a kill -9 lands mid-write
  --nan-loss SPEC      STEP[@RANK][/MICRO]: that step's loss is NaN (tests/helpers.install_nan_fault)
"""

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def install_slow_checkpoint(seconds: float) -> None:
    from distill.checkpoint import CheckpointManager

    def before_commit(self, tmp):
        time.sleep(seconds)

    CheckpointManager.before_commit = before_commit


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slow-checkpoint", type=float)
    p.add_argument("--nan-loss")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.slow_checkpoint:
        install_slow_checkpoint(args.slow_checkpoint)
    if args.nan_loss:
        from helpers import install_nan_fault

        install_nan_fault(args.nan_loss)
    from hydra import compose, initialize_config_dir

    import distill
    from distill.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(HERE.parent / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    distill.run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
