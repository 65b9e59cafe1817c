"""What a run leaves behind and what reads it: the folder format (:mod:`.folder`), loading
(:mod:`.load`), generation, export, the lm-eval model class and expert-usage reports."""
