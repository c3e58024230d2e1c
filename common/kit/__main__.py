import sys

from common.kit.run import main

sys.exit(main())
