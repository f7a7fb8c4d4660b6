# Crashes immediately: a crash loop.
import sys

sys.stderr.write("boom: cannot start\n")
sys.exit(3)
