"""What keeps a long run alive by itself (issue 12). So far:

    manifest.py   verified checkpoints: every rank fsyncs the files it wrote, a manifest holds a
                  checksum per file, and a checkpoint that fails verification is never loaded
"""
