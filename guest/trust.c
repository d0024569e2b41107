/* Install the per-VM matchlock CA into the image's system trust stores, so curl, Python,
 * Node and git trust the host proxy's certificates without flags. Layouts: Debian/Ubuntu
 * (/etc/ssl/certs/ca-certificates.crt), Alpine (/etc/ssl/cert.pem, usually a link to the
 * former), RHEL/Fedora (/etc/pki/tls/certs/ca-bundle.crt and the extracted PEM bundle).
 * The CA alone also goes to /etc/ssl/certs/matchlock-ca.crt (what SSL_CERT_FILE and
 * friends point at) and to the update-ca-certificates source dirs, so a later
 * `update-ca-certificates` in the guest keeps it. */
#include "guest.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const BUNDLES[] = {
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
};

static void make_parents(const char *path)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        mkdir(buf, 0755);
        *p = '/';
    }
}

static int write_file(const char *path, const char *data, size_t len, int append)
{
    make_parents(path);
    int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC);
    int fd = open(path, flags, 0644);
    if (fd < 0)
        return -1;
    while (len > 0) {
        ssize_t w = write(fd, data, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            close(fd);
            return -1;
        }
        data += w;
        len -= (size_t)w;
    }
    return close(fd);
}

int install_ca(const char *pem, char *err, size_t errsz)
{
    size_t len = strlen(pem);
    if (len < 64 || strncmp(pem, "-----BEGIN CERTIFICATE-----", 27) != 0) {
        snprintf(err, errsz, "install_ca: not a PEM certificate");
        return -1;
    }
    if (write_file("/etc/ssl/certs/matchlock-ca.crt", pem, len, 0) < 0) {
        snprintf(err, errsz, "write /etc/ssl/certs/matchlock-ca.crt: %s", strerror(errno));
        return -1;
    }
    write_file("/usr/local/share/ca-certificates/matchlock-ca.crt", pem, len, 0);
    write_file("/etc/pki/ca-trust/source/anchors/matchlock-ca.crt", pem, len, 0);

    /* Append once to every bundle; links (Alpine's cert.pem) are resolved so the same
     * file is not appended twice. */
    char done[sizeof BUNDLES / sizeof *BUNDLES][PATH_MAX];
    size_t ndone = 0, appended = 0;
    for (size_t i = 0; i < sizeof BUNDLES / sizeof *BUNDLES; i++) {
        char real[PATH_MAX];
        if (!realpath(BUNDLES[i], real))
            continue;
        int seen = 0;
        for (size_t j = 0; j < ndone; j++)
            seen |= !strcmp(done[j], real);
        if (seen)
            continue;
        snprintf(done[ndone++], PATH_MAX, "%s", real);
        if (write_file(real, "\n", 1, 1) == 0 && write_file(real, pem, len, 1) == 0)
            appended++;
    }
    /* An image without any CA bundle (busybox, distroless) gets one holding our CA. */
    if (!appended)
        write_file("/etc/ssl/certs/ca-certificates.crt", pem, len, 0);
    return 0;
}
