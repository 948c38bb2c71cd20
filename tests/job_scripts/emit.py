"""A Ray job entrypoint for the tests: prints numbered lines, optionally sleeps, exits with a code.

It only runs if the job's ``working_dir`` was uploaded (it is not on the cluster otherwise).
"""

import argparse
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lines", type=int, default=3)
parser.add_argument("--interval", type=float, default=0.0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--exit-code", type=int, default=0)
args = parser.parse_args()

for i in range(1, args.lines + 1):
    print(f"job line {i} of {args.lines}", flush=True)
    time.sleep(args.interval)
time.sleep(args.sleep)
print(f"last line before exit {args.exit_code}", end="")  # no newline, no flush: must still arrive
sys.exit(args.exit_code)
