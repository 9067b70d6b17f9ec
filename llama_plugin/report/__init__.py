"""Pictures of a run without W&B (`python -m llama_plugin.report <run_dir>`): PNG plots of
metrics.jsonl (loss, learning rate, gradient norm, throughput, evaluation metrics over steps) and a
Markdown page that shows them.

    plots.py     the figures, one per concern, written atomically
    __main__.py  the command
"""
