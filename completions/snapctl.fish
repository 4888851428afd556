# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_snapctl_global_optspecs
    string join \n s/store= json q/quiet v/verbose h/help V/version
end

function __fish_snapctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_snapctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_snapctl_using_subcommand
    set -l cmd (__fish_snapctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c snapctl -n "__fish_snapctl_needs_command" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_needs_command" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_needs_command" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_needs_command" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_needs_command" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "init" -d 'Format STORE as the exception store of ORIGIN (never writes to ORIGIN)'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "info" -d 'Show the store: format, sizes, space, policy, I/O engine'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "create" -d 'Take a read-only snapshot of the origin (instant: copies nothing)'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "prune" -d 'Delete the snapshots past their expiry time'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "schedule" -d 'Scheduled snapshots with retention (for cron or a systemd timer)'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "set-writable" -d 'Make a read-only snapshot writable; one-way: there is no way back to read-only'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "list" -d 'List snapshots, oldest first'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "ls" -d 'List snapshots, oldest first'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "show" -d 'Show one snapshot'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "rename" -d 'Rename a snapshot'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "delete" -d 'Delete snapshots and free what only they held'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "rm" -d 'Delete snapshots and free what only they held'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "export" -d 'Write the full image of a snapshot (or of `origin`) to FILE or stdout'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "write" -d 'Write data into the origin through copy-on-write (from FILE or stdin)'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "upgrade" -d 'Convert a store written by an older snapctl (format 2 or 3) to this version, in place'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "check" -d 'Verify the store: checksums, single ownership of every chunk, space accounting'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "diff" -d 'The byte ranges where two views differ, from metadata (TO defaults to origin)'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "restore" -d 'Make the origin identical to a snapshot, writing only the chunks that differ'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "serve" -d 'Serve the origin and every snapshot over NBD, in the foreground'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "generate-docs" -d 'Generate man pages and shell completions (for packagers)'
complete -c snapctl -n "__fish_snapctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -l origin -d 'The device (or file) whose snapshots to keep' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -l chunk-size -d 'Copy-on-write unit: a power of two from 4K to 1M (4096, 4K, 4KiB, 1M, 1MiB). Larger chunks make first writes after a snapshot cheaper (one copy covers more writes); smaller ones keep the copies of scattered writes small' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -l on-full -d 'What to do when the store has no room for a copy an origin write needs' -r -f -a "drop-oldest\t'Delete the oldest snapshots until the copy fits'
invalidate\t'Mark the snapshots that need the copy invalid (they refuse reads)'
fail-writes\t'Fail the origin write with ENOSPC'"
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -l metadata-size -d 'Metadata region size (default: 256 bytes per store chunk, at least 8 MiB)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -l force -d 'Overwrite a store that already holds snapctl data (its snapshots are lost)'
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand init" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand info" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand info" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand info" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand info" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand info" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand info" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l expires -d 'When it may be pruned: an RFC 3339 time or a duration (90m, 12h, 7d, 2w)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l label -d 'A KEY=VALUE label (repeatable)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l from -d 'Snapshot this snapshot instead of the origin (its point in time, and what it holds if it is writable)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l freeze -d 'Freeze this mounted file system while the snapshot is taken (repeatable)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l freeze-timeout -d 'Thaw after this long whatever happens (a duration: 30s, 2m)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l pre-hook -d 'Run this first (with /bin/sh -c); if it fails, no snapshot is taken' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l post-hook -d 'Run this after, whatever happened, once the pre-hook succeeded' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l hook-timeout -d 'Kill a hook still running after this long (a duration: 30s, 10m); a pre-hook killed means no snapshot' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l created-at -d 'Stamp the snapshot with this creation time (RFC 3339) instead of now' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l writable -d 'Make the new snapshot writable (a clone); see set-writable'
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand create" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -l now -d 'Decide as if it were TIME (RFC 3339)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -l config -d 'Configuration file naming stores (used when no store is given)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -l dry-run -d 'Say what would be deleted, delete nothing'
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand prune" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -f -a "run" -d 'Take each period\'s snapshot when due, then apply retention and expiry'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -f -a "status" -d 'Each period\'s newest snapshot and next due time; exits 10 when one is overdue'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and not __fish_seen_subcommand_from run status help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -l now -d 'Evaluate the schedule as if it were TIME (RFC 3339); snapshots are stamped with it' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -l config -d 'Configuration file' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -l dry-run -d 'Say what would be done, do nothing'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from run" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -l now -d 'Evaluate as if it were TIME (RFC 3339)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -l config -d 'Configuration file' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from status" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from help" -f -a "run" -d 'Take each period\'s snapshot when due, then apply retention and expiry'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from help" -f -a "status" -d 'Each period\'s newest snapshot and next due time; exits 10 when one is overdue'
complete -c snapctl -n "__fish_snapctl_using_subcommand schedule; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c snapctl -n "__fish_snapctl_using_subcommand set-writable" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand set-writable" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand set-writable" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand set-writable" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand set-writable" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand set-writable" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -l tree -d 'Show the genealogy: what each snapshot was taken from'
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand list" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -l tree -d 'Show the genealogy: what each snapshot was taken from'
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand ls" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand show" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand show" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand show" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand show" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand show" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand show" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand rename" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand rename" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand rename" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand rename" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand rename" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand rename" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -l force -d 'Delete even when an NBD client has the snapshot open (its reads then fail)'
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand delete" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -l force -d 'Delete even when an NBD client has the snapshot open (its reads then fail)'
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand rm" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -s o -l output -d 'Output file (default: stdout)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand export" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -l offset -d 'Byte offset in the origin' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -s i -l input -d 'Input file (default: stdin)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -l snapshot -d 'Write into this writable snapshot instead of the origin' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand write" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand upgrade" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand upgrade" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand upgrade" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand upgrade" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand upgrade" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand upgrade" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -l data -d 'Also read and verify every saved chunk (time proportional to the space in use)'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -l repair -d 'Mend leaks, indexes, counters and a damaged superblock (from its backup copy)'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -l drop-damaged -d 'With --repair: remove damaged rows and mark the snapshots that read them invalid'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand check" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand diff" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand diff" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand diff" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand diff" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand diff" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand diff" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -l to -d 'Write the snapshot\'s full image to DEVICE (a device or file at least the origin\'s size) instead, leaving the origin alone' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -l no-backup -d 'Do not take a safety snapshot first'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -l force -d 'Restore even while an NBD client has the origin open'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -l resume -d 'Finish a restore that a crash interrupted (any command on the store does)'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand restore" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l socket -d 'Unix socket for NBD clients (a missing parent directory is created 0700, or 0710 with --group)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l listen -d 'Also listen on TCP: PORT or HOST:PORT (without a host, 127.0.0.1); needs --tls-cert and --tls-key, or --no-tls on a loopback address' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l tls-cert -d 'The server\'s certificate chain for TLS on --listen (PEM: its certificate first)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l tls-key -d 'The private key of --tls-cert (PEM)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l tls-client-ca -d 'Require TCP clients to present a certificate signed by this CA (PEM)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l group -d 'Let the members of GROUP (a group name or numeric gid) use the sockets too: sockets 0660 and the run directory 0710, owned by GROUP' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l cache -d 'Memory for the store\'s metadata (like 64M or 1G, at least 4M): half for its page cache, half for the exception records last read, decoded and verified. Whatever the number of snapshots and exceptions, the server grows beyond its start by this, its connections\' buffers and the writes queued behind their copies (at most 32 MiB)' -r
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l no-tls -d 'Serve --listen as plain NBD, without TLS: allowed on a loopback address only (127.0.0.0/8 or ::1), where anyone on this machine who can reach the port can read and write the origin and every snapshot'
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c snapctl -n "__fish_snapctl_using_subcommand serve" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -l out-dir -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -s s -l store -d 'The exception store (a block device or a file)' -r -F
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -l json -d 'Print one JSON object on stdout (errors as JSON on stderr)'
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -s q -l quiet -d 'Print nothing but errors'
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -s v -l verbose -d 'Say more (which I/O engine is in use, what the store did on its own)'
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -s h -l help -d 'Print help'
complete -c snapctl -n "__fish_snapctl_using_subcommand generate-docs" -s V -l version -d 'Print version'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "init" -d 'Format STORE as the exception store of ORIGIN (never writes to ORIGIN)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "info" -d 'Show the store: format, sizes, space, policy, I/O engine'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "create" -d 'Take a read-only snapshot of the origin (instant: copies nothing)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "prune" -d 'Delete the snapshots past their expiry time'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "schedule" -d 'Scheduled snapshots with retention (for cron or a systemd timer)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "set-writable" -d 'Make a read-only snapshot writable; one-way: there is no way back to read-only'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "list" -d 'List snapshots, oldest first'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "show" -d 'Show one snapshot'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "rename" -d 'Rename a snapshot'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "delete" -d 'Delete snapshots and free what only they held'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "export" -d 'Write the full image of a snapshot (or of `origin`) to FILE or stdout'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "write" -d 'Write data into the origin through copy-on-write (from FILE or stdin)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "upgrade" -d 'Convert a store written by an older snapctl (format 2 or 3) to this version, in place'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "check" -d 'Verify the store: checksums, single ownership of every chunk, space accounting'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "diff" -d 'The byte ranges where two views differ, from metadata (TO defaults to origin)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "restore" -d 'Make the origin identical to a snapshot, writing only the chunks that differ'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "serve" -d 'Serve the origin and every snapshot over NBD, in the foreground'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "generate-docs" -d 'Generate man pages and shell completions (for packagers)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and not __fish_seen_subcommand_from init info create prune schedule set-writable list show rename delete export write upgrade check diff restore serve generate-docs help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and __fish_seen_subcommand_from schedule" -f -a "run" -d 'Take each period\'s snapshot when due, then apply retention and expiry'
complete -c snapctl -n "__fish_snapctl_using_subcommand help; and __fish_seen_subcommand_from schedule" -f -a "status" -d 'Each period\'s newest snapshot and next due time; exits 10 when one is overdue'
