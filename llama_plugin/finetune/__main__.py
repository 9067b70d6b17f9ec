"""python -m llama_plugin.finetune <recipe> [overrides]; see llama_plugin/finetune/__init__.py."""

import sys

from llama_plugin.finetune.trainer import main

sys.exit(main())
