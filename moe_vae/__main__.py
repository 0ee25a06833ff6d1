"""Allow `python -m moe_vae ...` as an alias of the `moe-vae` console script."""

from moe_vae.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
