import sys

from ecomserve.front.service import main

sys.exit(main())
