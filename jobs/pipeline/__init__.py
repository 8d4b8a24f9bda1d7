"""`cotd run`: generate -> curate -> train -> evaluate in one run directory, each stage skipped when
its outputs are complete and its settings and inputs unchanged, resumed when partial."""
