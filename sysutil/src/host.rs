//! The host's name, as the kernel reports it (`uname -n`).

/// This machine's host name; `localhost` if the kernel reports an empty or non-UTF-8 one.
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    match uname.nodename().to_str() {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_the_kernel() {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let kernel = kernel.trim();
        let expected = if kernel.is_empty() { "localhost" } else { kernel };
        assert_eq!(super::hostname(), expected);
    }
}
