"""`python -m mfa_hf.doctor`: the same as `mfa-hf doctor`."""

from . import main

raise SystemExit(main())
