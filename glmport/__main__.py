import sys

from glmport.cli import main

sys.exit(main())
