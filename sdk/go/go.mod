module matchlock.dev/go

go 1.22
