module matchlock.dev/examples

go 1.22

require matchlock.dev/go v0.0.0

replace matchlock.dev/go => ../../sdk/go
