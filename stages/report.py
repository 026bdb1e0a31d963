"""DVC stage: python stages/report.py --help"""

from mdkat.cli import run_stage

if __name__ == "__main__":
    run_stage("report")
