"""``python -m urfm_fast.shard_index DIR``: the older spelling of ``python -m urfm_fast.data.shards DIR``."""

import sys

from urfm_fast.data.shards import main

if __name__ == "__main__":
    sys.exit(main())
