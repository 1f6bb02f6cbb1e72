"""The bodies of the commands that string the rooms together: ``demo`` (generate, fine-tune, evaluate),
``info`` (describe a database or a checkpoint) and ``relax`` (relax the structures of a file)."""
