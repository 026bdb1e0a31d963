"""DVC stage: python stages/evaluate.py --help"""

from mdkat.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate")
