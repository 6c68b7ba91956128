/* The `gorgon` CLI's commands that live in their own files. */
#ifndef GORGON_CLI_H
#define GORGON_CLI_H

/* `gorgon pull ...` (argv[0] is "pull"): exit status. */
int cli_pull(int argc, char **argv);

#endif
