"""Imported first by the decode processes' fork server (its preload): it moves the server,
and so every decode process forked from it, into a process group of its own.

A signal sent to the command's group (Ctrl-C in a terminal, `kill -TERM -- -PGID`, a
scheduler stopping the job) then reaches the command alone, which ends its pool in order.
Reached by it too, a decode process killed while it waited for a task would die holding the
pool's queue lock, and the pool's shutdown would wait for that lock for ever (a stopped
label job hung after its last line, and the pool started new processes meanwhile)."""

import os

os.setpgrp()
