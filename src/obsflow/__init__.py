"""obsflow: telescope data from the instant a frame is written to archived and queryable.

The package follows the way of one file (see the README): ``registry`` says what
files and pipelines exist; ``receipt`` takes a file in; ``cache`` holds it;
``catalog`` records it (with the durable ingest ``queue``); ``ingest`` moves it
to archive ``storage``. ``app`` assembles a site; ``cli`` is the command.
"""

__version__ = "0.1.0.dev0"
