/* matchlock-guest: the guest runtime.
 *
 *   as PID 1 (the initramfs /init):   boot the guest, then serve the channel (init.c)
 *   matchlock-guest agent --fd N:     serve the channel on an inherited stream fd, as an
 *                                     ordinary process (host-side tests)
 *   matchlock-guest fused --fd N --mount DIR [--bounce FILE]:
 *                                     mount DIR as FUSE and relay it over fd N (host-side
 *                                     tests; in the VM init starts it on the VFS port),
 *                                     READ data through FILE when the host says so
 */
#include "guest.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int usage(void)
{
    fprintf(stderr, "usage: matchlock-guest agent --fd N | fused --fd N --mount DIR "
                    "[--bounce FILE]   (as PID 1 it boots the guest)\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (getpid() == 1)
        return init_main();
    if (argc == 4 && !strcmp(argv[1], "agent") && !strcmp(argv[2], "--fd")) {
        char *end;
        long fd = strtol(argv[3], &end, 10);
        if (*end || fd < 0 || fd > 65535)
            return usage();
        if (getenv("MATCHLOCK_GUEST_DEBUG"))
            g_debug = 1;
        return agent_run((int)fd, 0);
    }
    if ((argc == 6 || (argc == 8 && !strcmp(argv[6], "--bounce"))) &&
        !strcmp(argv[1], "fused") && !strcmp(argv[2], "--fd") && !strcmp(argv[4], "--mount")) {
        char *end;
        long fd = strtol(argv[3], &end, 10);
        if (*end || fd < 0 || fd > 65535)
            return usage();
        if (getenv("MATCHLOCK_GUEST_DEBUG"))
            g_debug = 1;
        /* --bounce FILE: the bounce file itself (tests on the host share its page cache
         * with the server, so no O_DIRECT); without it, all READ data comes over the fd. */
        int bounce = argc == 8 ? open(argv[7], O_RDONLY | O_CLOEXEC) : -1;
        if (argc == 8 && bounce < 0) {
            perror(argv[7]);
            return 1;
        }
        return fused_run((int)fd, bounce, argv[5], -1);
    }
    return usage();
}
