import sys

from agentcheck.main import main

sys.exit(main())
