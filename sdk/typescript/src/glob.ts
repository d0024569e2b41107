/** Path globs for SDK-local VFS hooks, as the reference TypeScript SDK matches them
 * (minimatch with `dot: true`): `*` and `?` stay within one path segment, `**` crosses
 * segments, `[...]` is a character class. */

function escapeRegExp(ch: string): string {
  return /[\\^$.*+?()[\]{}|/]/.test(ch) ? `\\${ch}` : ch;
}

export function globToRegExp(pattern: string): RegExp {
  let re = "";
  for (let i = 0; i < pattern.length; i++) {
    const ch = pattern[i];
    if (ch === "*") {
      if (pattern[i + 1] === "*") {
        i++;
        if (pattern[i + 1] === "/") {
          i++;
          re += "(?:.*/)?"; // `**/` also matches zero segments
        } else {
          re += ".*";
        }
      } else {
        re += "[^/]*";
      }
    } else if (ch === "?") {
      re += "[^/]";
    } else if (ch === "[") {
      const end = pattern.indexOf("]", i + 2);
      if (end < 0) {
        re += "\\[";
        continue;
      }
      let body = pattern.slice(i + 1, end);
      if (body.startsWith("!")) {
        body = `^${body.slice(1)}`;
      }
      re += `[${body.replace(/\\/g, "\\\\")}]`;
      i = end;
    } else {
      re += escapeRegExp(ch);
    }
  }
  return new RegExp(`^${re}$`);
}

const cache = new Map<string, RegExp>();

export function globMatch(pattern: string, path: string): boolean {
  let re = cache.get(pattern);
  if (!re) {
    try {
      re = globToRegExp(pattern);
    } catch {
      return false;
    }
    cache.set(pattern, re);
  }
  return re.test(path);
}
