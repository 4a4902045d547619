"""python -m mfa_hf.testing_layouts explore BACKEND KIND [EXAMPLES] [SEED]"""

from .explore import main

raise SystemExit(main())
