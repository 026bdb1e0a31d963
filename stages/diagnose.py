"""Stage (synthetic data only, so not in dvc.yaml): python stages/diagnose.py --help"""

from mdkat.cli import run_stage

if __name__ == "__main__":
    run_stage("diagnose")
