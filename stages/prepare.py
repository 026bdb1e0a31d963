"""DVC stage: python stages/prepare.py --out DIR [--params FILE] [-S key=value ...]"""

from mdkat.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare")
