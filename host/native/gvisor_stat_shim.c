/*
 * Preloaded (/etc/ld.so.preload) into every process of a `gvisor` sandbox.
 *
 * gVisor's kernel before 2023 (Debian bookworm's runsc 20221219) answers
 * EINVAL to the stat family when AT_NO_AUTOMOUNT is set, and coreutils
 * sets it (`ls -l`, `stat`, `find -printf`), so they fail on every file.
 * gVisor has no automount points, so the flag means nothing there: these
 * wrappers drop it and make the same system call. Nothing else changes.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_NO_AUTOMOUNT
#define AT_NO_AUTOMOUNT 0x800
#endif

struct statx;

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}

int fstatat(int dirfd, const char *path, struct stat *buf, int flags)
{
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}

int fstatat64(int dirfd, const char *path, struct stat64 *buf, int flags)
{
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}

/* What binaries built against glibc before 2.33 call. */
int __fxstatat64(int version, int dirfd, const char *path, struct stat64 *buf, int flags)
{
    (void)version;
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}

int __fxstatat(int version, int dirfd, const char *path, struct stat *buf, int flags)
{
    (void)version;
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}
